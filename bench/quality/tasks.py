"""Synthetic multilingual tasks, generated offline and deterministically from small word lists.

Task types (each with prompts in every language, an exact target, and a
train / test split drawn from disjoint seeds):

- ``date``: reformat a written date ("3 März 2021") as ISO ("2021-03-03").
- ``extract``: name the city field of a short record ("name: Anna; Stadt: Köln; ...").
- ``reply``: answer in a fixed format, the language's answer label and the item in capitals.
- ``typo``: correct one injected typo (two swapped letters) in a word of the language.
- ``count``: count the words of a short list of nouns (digits).

The score is exact match of the whole target, measured by teacher forcing (``scoring.py``);
token F1 of greedy output (first line) is the optional generation cross-check,
which is exact match for one-token targets.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

TYPES = ("date", "extract", "reply", "typo", "count")
LANGS = ("en", "de", "fr", "es", "it", "nl", "pt", "sv")

MONTHS = {
    "en": "January February March April May June July August September October November December",
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
    "it": "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
    "nl": "januari februari maart april mei juni juli augustus september oktober november december",
    "pt": "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro",
    "sv": "januari februari mars april maj juni juli augusti september oktober november december",
}
NOUNS = {
    "en": "apple house river garden window bottle mountain letter table flower bridge candle",
    "de": "Apfel Haus Fluss Garten Fenster Flasche Berg Brief Tisch Blume Brücke Kerze",
    "fr": "pomme maison rivière jardin fenêtre bouteille montagne lettre table fleur pont bougie",
    "es": "manzana casa río jardín ventana botella montaña carta mesa flor puente vela",
    "it": "mela casa fiume giardino finestra bottiglia montagna lettera tavolo fiore ponte candela",
    "nl": "appel huis rivier tuin venster fles berg brief tafel bloem brug kaars",
    "pt": "maçã casa rio jardim janela garrafa montanha carta mesa flor ponte vela",
    "sv": "äpple hus flod trädgård fönster flaska berg brev bord blomma bro ljus",
}
CITIES = {
    "en": "London Leeds York Bristol Oxford Dover Bath Derby",
    "de": "Berlin Köln Bremen Dresden Leipzig Bonn Kiel Ulm",
    "fr": "Paris Lyon Nantes Lille Nice Brest Dijon Reims",
    "es": "Madrid Sevilla Bilbao Toledo Cádiz Murcia León Vigo",
    "it": "Roma Milano Torino Napoli Bari Pisa Genova Parma",
    "nl": "Utrecht Delft Leiden Breda Zwolle Gouda Venlo Assen",
    "pt": "Lisboa Porto Braga Faro Évora Viseu Aveiro Beja",
    "sv": "Malmö Uppsala Lund Umeå Gävle Borås Visby Luleå",
}
NAMES = {
    "en": "Alice Bob Emma Jack", "de": "Anna Lukas Lena Jonas", "fr": "Louise Hugo Chloé Lucas",
    "es": "Lucía Pablo Sofía Diego", "it": "Giulia Marco Sara Luca", "nl": "Sanne Daan Fleur Bram",
    "pt": "Beatriz Tiago Inês Rui", "sv": "Elsa Oskar Maja Hugo",
}
#: per language: field labels (name, city, age), the answer label, and the five instructions
LABELS = {
    "en": ("name", "city", "age", "Answer"),
    "de": ("Name", "Stadt", "Alter", "Antwort"),
    "fr": ("nom", "ville", "âge", "Réponse"),
    "es": ("nombre", "ciudad", "edad", "Respuesta"),
    "it": ("nome", "città", "età", "Risposta"),
    "nl": ("naam", "stad", "leeftijd", "Antwoord"),
    "pt": ("nome", "cidade", "idade", "Resposta"),
    "sv": ("namn", "stad", "ålder", "Svar"),
}
INSTRUCTIONS = {
    "en": ("Write the date in ISO format:", "Which city is in the record?", "Reply in the fixed format to:",
           "Correct the spelling:", "How many words are in the list?"),
    "de": ("Schreibe das Datum im ISO-Format:", "Welche Stadt steht im Eintrag?", "Antworte im festen Format auf:",
           "Korrigiere die Schreibweise:", "Wie viele Wörter hat die Liste?"),
    "fr": ("Écris la date au format ISO :", "Quelle ville est dans la fiche ?", "Réponds au format fixe à :",
           "Corrige l'orthographe :", "Combien de mots dans la liste ?"),
    "es": ("Escribe la fecha en formato ISO:", "¿Qué ciudad aparece en la ficha?", "Responde en el formato fijo a:",
           "Corrige la ortografía:", "¿Cuántas palabras tiene la lista?"),
    "it": ("Scrivi la data in formato ISO:", "Quale città è nella scheda?", "Rispondi nel formato fisso a:",
           "Correggi l'ortografia:", "Quante parole ci sono nella lista?"),
    "nl": ("Schrijf de datum in ISO-formaat:", "Welke stad staat in het record?", "Antwoord in het vaste formaat op:",
           "Verbeter de spelling:", "Hoeveel woorden staan in de lijst?"),
    "pt": ("Escreve a data no formato ISO:", "Que cidade está na ficha?", "Responde no formato fixo a:",
           "Corrige a ortografia:", "Quantas palavras tem a lista?"),
    "sv": ("Skriv datumet i ISO-format:", "Vilken stad står i posten?", "Svara i det fasta formatet på:",
           "Rätta stavningen:", "Hur många ord finns i listan?"),
}


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str


def task_name(kind: str, lang: str) -> str:
    return f"{kind}_{lang}"


def split(task: str) -> tuple[str, str]:
    kind, lang = task.rsplit("_", 1)
    return kind, lang


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + word[-1]
    for _ in range(10):
        i = rng.randrange(len(word) - 1)
        if word[i] != word[i + 1]:
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word + word[-1]


def make(kind: str, lang: str, rng: random.Random) -> Example:
    """One example of task ``kind`` in ``lang``; deterministic given ``rng``'s state."""
    inst = INSTRUCTIONS[lang][TYPES.index(kind)]
    nouns = NOUNS[lang].split()
    if kind == "date":
        month = rng.randrange(12)
        day, year = rng.randint(1, 28), rng.randint(1990, 2029)
        text = f"{day} {MONTHS[lang].split()[month]} {year}"
        return Example(f"{inst} {text}\n", f"{year}-{month + 1:02d}-{day:02d}")
    if kind == "extract":
        name_l, city_l, age_l, _ = LABELS[lang]
        city = rng.choice(CITIES[lang].split())
        fields = [f"{name_l}: {rng.choice(NAMES[lang].split())}", f"{city_l}: {city}", f"{age_l}: {rng.randint(18, 90)}"]
        rng.shuffle(fields)
        return Example(f"{inst} {' ; '.join(fields)}\n", city)
    if kind == "reply":
        item = rng.choice(nouns)
        return Example(f"{inst} {item}\n", f"{LABELS[lang][3]}: {item.upper()} .")
    if kind == "typo":
        word = rng.choice(nouns).lower()
        return Example(f"{inst} {_typo(word, rng)}\n", word)
    if kind == "count":
        n = rng.randint(2, 7)
        return Example(f"{inst} {' '.join(rng.choice(nouns) for _ in range(n))}\n", str(n))
    raise ValueError(f"kind: unknown task type {kind!r}")


def dataset(kind: str, lang: str, n_train: int, n_test: int, seed: int = 0,
            n_val: int = 0) -> tuple[list[Example], list[Example]] | tuple[list[Example], list[Example], list[Example]]:
    """Train / test examples (and ``n_val`` held-out ones when asked: train, val, test).

    No prompt repeats across the splits; the test set is drawn before the held-out
    set, so adding a held-out set leaves train and test unchanged.
    """
    rng = random.Random(f"{seed}-{kind}-{lang}")
    train = [make(kind, lang, rng) for _ in range(n_train)]
    seen = {e.prompt for e in train}

    def fresh(n: int) -> list[Example]:
        out: list[Example] = []
        for _ in range(50 * n + 100):
            if len(out) == n:
                break
            e = make(kind, lang, rng)
            if e.prompt not in seen:
                seen.add(e.prompt)
                out.append(e)
        while len(out) < n:   # tiny spaces: allow repeats rather than fail
            out.append(make(kind, lang, rng))
        return out

    test = fresh(n_test)
    return (train, test) if not n_val else (train, fresh(n_val), test)


def f1(prediction: str, target: str) -> float:
    """Token F1 on whitespace tokens of the first output line (exact match for one-token targets)."""
    pred = prediction.strip().split("\n")[0].split()
    gold = target.split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or common == 0:
        return float(pred == gold)
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)
