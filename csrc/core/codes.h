// Named integer codes shared with the caller (dtype, keep kind, combine mode,
// sign method, truncation route): each enum's header lists its (name, value)
// pairs once, and the Python module exports those tables (_C.DTYPES, ...), so
// the codes are written down in one place only.
#pragma once

#include <cstddef>
#include <string>

namespace kmf {

struct CodeName {
    const char* name;
    int code;
};

/// The name of `code` in `table`, or "invalid".
template <std::size_t N>
const char* code_name(const CodeName (&table)[N], int code) {
    for (const CodeName& c : table)
        if (c.code == code) return c.name;
    return "invalid";
}

template <std::size_t N>
bool valid_code(const CodeName (&table)[N], long long code) {
    for (const CodeName& c : table)
        if (c.code == code) return true;
    return false;
}

/// "0 (float32), 1 (float16), ..." for error messages.
template <std::size_t N>
std::string codes_text(const CodeName (&table)[N]) {
    std::string s;
    for (std::size_t i = 0; i < N; ++i) {
        if (i > 0) s += i + 1 == N ? " or " : ", ";
        s += std::to_string(table[i].code) + " (" + table[i].name + ")";
    }
    return s;
}

}  // namespace kmf
