"""Code shared by several test files (not collected: no test_*.py here).

Test files import what they share from here or from conftest.py, never from
each other: ``cpp_tasks`` describes tensors to ``kmerge_fast._C``; the
``*_cases`` modules hold backend-agnostic checks that a test file runs under
the backends its fixture selects (test_similarity.py, test_merge.py and
test_merge_methods.py on the CPU backends, test_triton.py on Triton).
"""
