"""PTB tokenization exactly as pycocoevalcap does it, with Java or without.

Published captioning scores (BLEU, METEOR, ROUGE-L, CIDEr) are computed on text that pycocoevalcap's
`PTBTokenizer` has tokenized: it runs Stanford CoreNLP 3.4.1's `edu.stanford.nlp.process.PTBTokenizer
-preserveLines -lowerCase` (the jar shipped inside pycocoevalcap) over all captions, one per line, then drops the
tokens of its PUNCTUATIONS list and joins the rest with single spaces. Scores on any other tokenization are not
comparable with papers, so this module reproduces that output, string for string:

- `java_ptb_tokenize(texts)`: the same jar, class, flags and post-filter, in one JVM for the whole list, but with the
  input file in a private temporary directory. pycocoevalcap writes it into its installed package folder, which
  fails where site-packages is read-only and is unsafe when two evaluations run at once.
- `python_ptb_tokenize(texts)`: a pure-Python twin for machines without Java. It transcribes the rules of PTBLexer
  (the JFlex grammar behind PTBTokenizer, CoreNLP 3.4.1) with JFlex's semantics: at each position every rule is
  tried, the longest match wins (trailing context counts), ties go to the rule listed first. The tests hold it
  token-for-token equal to the Java output.
- `ptb_tokenize(texts, backend="auto")`: Java when `java` is on PATH, else the twin.
- `evaluation_texts(hypotheses, references)`: what pycocoevalcap's scorers receive, both tokenised as it does.

What the Java tokenizer does that one would not guess, and the twin therefore does too:

- Brackets become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB- and are then lowercased, so pycocoevalcap's filter (which
  lists "-LRB-" etc. in upper case) keeps them: "a shirt (red)" -> "a shirt -lrb- red -rrb-".
- Only tokens equal to an entry of PUNCTUATIONS are dropped: "?!", "!!!", "&", "%", "$", "#", "/" stay, and so do
  smileys, which are one token (":)" -> ":-rrb-").
- Abbreviations keep their period ("mr.", "st.", "u.s.", "etc.", "no." before a number) but ordinary words lose it,
  and some of the list is case-sensitive ("Pa." -> "pa.", "pa." -> "pa").
- "cannot", "gonna", "wanna", ... are split ("can not", "gon na"); "can't" -> "ca n't"; curly quotes and the
  LaTeX quotes "`` ''" all count as quotes.
- Currency, fractions and dashes are normalized ("£" -> "#", "€" -> "$", "½" -> "1/2", "—" -> "--"); a number
  and a fraction ("5 1/2"), or digit groups shaped like a phone number, make one token whose space becomes a
  non-breaking one ("5\\xa01/2").
- Characters outside the Basic Multilingual Plane (emoji) are dropped, as Java sees them as two unknown halves.
- The lexer reads all captions as one text, so a caption's last token can depend on the next caption (":)" at the
  very end of the input is not a smiley; "letter A." before a caption starting "A " loses its period). Results are
  therefore defined for a list, as pycocoevalcap defines them; both backends read the list the same way.

Line breaks inside a caption are replaced by spaces (pycocoevalcap does this for "\\n"; the other characters the
lexer ends a line on, such as "\\r", are replaced too, as they would shift every later caption onto the wrong line).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["PUNCTUATIONS", "evaluation_texts", "java_available", "java_ptb_tokenize", "ptb_tokenize",
           "python_ptb_tokenize", "tokenized_references"]

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, verbatim (upper-case brackets included)
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
JAR_NAME = "stanford-corenlp-3.4.1.jar"
JAVA_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
JAVA_FLAGS = ("-preserveLines", "-lowerCase")

# the characters PTBLexer ends a line on (its NEWLINE macro, less \x85, which it reads as an ellipsis)
_LINE_BREAKS = re.compile(r"[\n\r\u2028\u2029\x0b\x0c]")


def ptb_tokenize(texts: Sequence[str], backend: str = "auto") -> list[str]:
    """Each text as pycocoevalcap's PTBTokenizer outputs it: lowercased PTB tokens joined by single spaces,
    punctuation tokens removed. backend: "java" (the real tokenizer), "python" (its twin), "auto" (java when
    available)."""
    if backend == "auto":
        backend = "java" if java_available() else "python"
    if backend == "java":
        return java_ptb_tokenize(texts)
    if backend == "python":
        return python_ptb_tokenize(texts)
    raise ValueError(f"unknown PTB tokenizer backend {backend!r}: use 'auto', 'java' or 'python'")


def tokenized(texts: Sequence[str], tokenizer: str | None) -> list[str]:
    """`ptb_tokenize` with `tokenizer` as its backend; None: the texts are already tokenised."""
    return list(texts) if tokenizer is None else ptb_tokenize(texts, backend=tokenizer)


def tokenized_references(references: Sequence[Sequence[str]], tokenizer: str | None) -> dict[int, list[str]]:
    """{image index: its tokenised references}, all of them tokenised in one call, as pycocoevalcap does."""
    rest = iter(tokenized([r for refs in references for r in refs], tokenizer))
    return {i: [next(rest) for _ in refs] for i, refs in enumerate(references)}


def evaluation_texts(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str | None = "auto"):
    """pycocoevalcap's inputs: ({i: [tokenised references]}, {i: [tokenised hypothesis]}). References and
    hypotheses are tokenised in two calls, in image order, as pycocoevalcap tokenises them: the PTB lexer reads a
    call's captions as one text, so a caption's last token can depend on the caption after it."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    gts = tokenized_references(references, tokenizer)
    # pycocoevalcap's scorers choke on an empty hypothesis string; a lone space scores like an empty caption
    res = {i: [h or " "] for i, h in enumerate(tokenized(hypotheses, tokenizer))}
    return gts, res


def java_available() -> bool:
    """Whether the Java backend can run: `java` on PATH and pycocoevalcap's CoreNLP jar installed."""
    return shutil.which("java") is not None and jar_path().is_file()


def jar_path() -> Path:
    """The CoreNLP 3.4.1 jar that pycocoevalcap ships (found without importing its modules)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return Path("pycocoevalcap-not-installed") / "tokenizer" / JAR_NAME  # callers report the missing jar
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / JAR_NAME


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of captions, got a single string (wrap it in a list)")
    return [_LINE_BREAKS.sub(" ", t) for t in texts]


def _filter_line(line: str) -> str:
    """pycocoevalcap's post-filter of one output line, verbatim."""
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


# --------------------------------------------------------------------------------------------- the Java tokenizer

def java_ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The real Stanford PTBTokenizer, run as pycocoevalcap runs it (one JVM for the whole list)."""
    return [_filter_line(line) for line in java_ptb_lines(texts)]


def java_ptb_lines(texts: Sequence[str]) -> list[str]:
    """The tokenizer's raw output line per text (punctuation not yet removed)."""
    texts = _texts(texts)
    if not texts:
        return []
    jar = jar_path()
    if not jar.is_file():
        raise RuntimeError(f"PTB tokenizer: CoreNLP jar not found at {jar} (is pycocoevalcap installed?)")
    with tempfile.TemporaryDirectory(prefix="ptb-tokenizer-") as tmp:
        path = Path(tmp) / "captions.txt"
        # surrogatepass: a stray surrogate (on which pycocoevalcap's .encode() raises) reaches Java as bytes it
        # cannot decode, which it drops, as the twin drops the surrogate
        path.write_bytes("\n".join(texts).encode("utf-8", errors="surrogatepass"))
        cmd = ["java", "-cp", str(jar), JAVA_CLASS, *JAVA_FLAGS, str(path)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise RuntimeError(f"PTB tokenizer: could not start java ({e}); command: {' '.join(cmd)}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", errors="replace").strip()[-2000:]
        raise RuntimeError(f"PTB tokenizer: java {JAVA_CLASS} from {jar} exited with status {proc.returncode}: {err}")
    lines = proc.stdout.decode("utf-8", errors="replace").replace("\r\n", "\n").split("\n")
    if len(lines) != len(texts):
        raise RuntimeError(f"PTB tokenizer: java {JAVA_CLASS} from {jar} returned {len(lines)} lines for "
                           f"{len(texts)} captions")
    return lines


# ------------------------------------------------------------------------------------------ the pure-Python twin

def python_ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The pure-Python twin of the Java tokenizer: the same output strings, no JVM."""
    return [_filter_line(" ".join(tokens)) for tokens in python_ptb_tokens(texts)]


def python_ptb_tokens(texts: Sequence[str]) -> list[list[str]]:
    """The twin's raw tokens per text (punctuation not yet removed)."""
    texts = _texts(texts)
    if not texts:
        return []
    text = "\n".join(texts)
    astral = _ASTRAL.search(text) is not None
    if astral:  # Java's lexer sees UTF-16 code units: an emoji is two surrogates, neither of them tokenizable
        text = _ASTRAL.sub(_to_surrogates, text)
    lines = _Lexer.get().lex(text)
    if astral:
        lines = [[t.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass") for t in line]
                 for line in lines]
    return lines


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _to_surrogates(m: re.Match) -> str:
    c = ord(m.group()) - 0x10000
    return chr(0xD800 + (c >> 10)) + chr(0xDC00 + (c & 0x3FF))


def _char_class(pred: Callable[[str], bool]) -> str:
    """Regex character-class body for the BMP characters satisfying pred (Java's lexer only knows the BMP)."""
    parts, start = [], None
    for c in range(0x10001):
        inside = c < 0x10000 and not 0xD800 <= c < 0xE000 and pred(chr(c))
        if inside and start is None:
            start = c
        elif not inside and start is not None:
            parts.append(f"\\u{start:04x}" if c - 1 == start else f"\\u{start:04x}-\\u{c - 1:04x}")
            start = None
    return "".join(parts)


# Token rewrites: PTBLexer's actions under the options `-preserveLines` leaves on (ptb3 escaping, LaTeX quotes)
_STRAIGHT_SINGLE = re.compile(r"&(?i:apos);|'")
_STRAIGHT_DOUBLE = re.compile(r'"|&(?i:quot);')
_CURLY = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
                        "\u0092": "'", "\u2019": "'", "\u203a": "'",
                        "\u0093": "``", "\u201c": "``", "\u00ab": "``",
                        "\u0094": "''", "\u201d": "''", "\u00bb": "''"})


def _quotes(text: str, left: bool) -> str:
    """latexQuotes: a straight quote by the lexer's guess of its side, a curly one by its shape."""
    text = _STRAIGHT_SINGLE.sub("`" if left else "'", text)
    text = _STRAIGHT_DOUBLE.sub("``" if left else "''", text)
    return text.translate(_CURLY)


def _soft(text: str) -> str:
    """Soft hyphens only mark line-break points; a token made of nothing else becomes "-"."""
    return text.replace("\u00ad", "") or "-"


_CURRENCY = str.maketrans({"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
                           "\u20ac": "$"})
_FRACTIONS = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _nbsp(text: str) -> str:
    """normalizeSpace: a token never holds a plain space (pycocoevalcap splits on them)."""
    return text.replace(" ", "\u00a0")


def _amp(text: str) -> str:
    return re.sub(r"&(?i:amp);", "&", text)


# An action maps the matched text to (tokens, characters consumed); consuming less is JFlex's yypushback.
def _keep(t):
    return [t], len(t)


def _drop(t):
    return [], len(t)


def _map(f):
    return lambda t: ([f(t)], len(t))


def _pushback(n):
    return lambda t: ([t[:-n]], len(t) - n)


def _period_again(t):
    """Abbreviation ending a sentence: the token keeps its period and the period is read again as a token."""
    return [t], len(t) - 1


def _acronym_ends_sentence(t):
    # a one-letter "acronym" ("I.", "A.") before a sentence start is a word and a period
    return ([t[0]], 1) if len(t) == 2 else ([t], len(t) - 1)


class _Lexer:
    """PTBLexer's rules as Python regexes, in the grammar's order, and the longest-match loop over them."""

    _instance = None

    @classmethod
    def get(cls) -> "_Lexer":
        if cls._instance is None:  # built on first use: the letter classes take a moment to compute
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        # JFlex's %caseless makes literal text case-insensitive but not character classes, hence (?i:...) around
        # literals only; a class written "[M]iss" in the grammar is "M(?i:iss)" here.
        LET = _char_class(str.isalpha)  # [:letter:] (Java's Character.isLetter: the L* categories)
        UPPER = _char_class(lambda c: c.isupper() and c.isalpha())
        L = f"[{LET}]"
        LD = f"[{LET}\\d]"
        SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
        # the grammar adds soft hyphen, combining marks and some letters its [:letter:] lacked
        extra = ("\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385"
                 "\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd"
                 "\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef"
                 "\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903"
                 "\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd"
                 "\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2"
                 "\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
                 "\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
        LETTER = f"(?:[{LET}{extra}]|{SPLET})"
        LETTER_DIGIT = f"(?:[{LET}{extra}\\d]|{SPLET})"
        WORD = f"{LETTER}{LETTER_DIGIT}*(?:[.!?]{LETTER}{LETTER_DIGIT}*)*"  # "hello.world" is one word
        SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
        SPACENL = "[ \t\u00a0\u2000-\u200a\u3000\n\r\u2028\u2029\x0b\x0c\x85]"
        # (a quoted attribute value may not span lines here: Java's output would lose its line alignment)
        SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*"
                r"(?:'[^'\n]*'|\"[^\"\n]*\")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
        SENTEND = f"{SPACENL}(?:{SPACENL}|[{UPPER}]|{SGML})"
        NUMBER = r"[\-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)"
        FRAC = r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}"
        APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
        APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201b]|&(?i:apos);)"  # also seen inside words
        HYPHEN = r"[\-_\u058a\u2010\u2011]"
        REDAUX = f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
        SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"  # a word before n't cannot end in n
        SREDAUX = f"(?i:n){APOSETC}(?i:t)"
        ACRO_X = r"(?i:(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
        ACRO = rf"(?:[A-Za-z](?:\.[A-Za-z])*|{ACRO_X})"
        ACRO2 = rf"(?:[A-Za-z](?:\.[A-Za-z])+|{ACRO_X})"
        THING = f"(?:[dDoOlL]{APOSETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{LD})?{LD}+)*"
        HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\.|[A-Za-z0-9\u00ad]+))+"
        THINGA = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
        # abbreviations normally followed by a lower-case word (a capital after them also ends the sentence)
        ABMONTH = "(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)"
        ABDAYS = "(?i:Mon|Tue|Tues|Wed|Thu|Thurs|Fri)"
        ABSTATE = ("(?i:Ala|Ariz)|A(?i:z)|A(?i:rk)|(?i:Calif|Colo|Conn|Ct|Dak)|D(?i:el)|(?i:Fla|Ga)|I(?i:ll)"
                   "|(?i:Ind|Kans?|Ky)|L(?i:a)|M(?i:ass)|(?i:Md|Mich|Minn)|M(?i:iss)|(?i:Mo|Mont|Neb|Nev|Okla)"
                   "|O(?i:re)|P(?i:a)|(?i:Penn|Tenn)|T(?i:ex)|(?i:Va|Vt)|W(?i:ash)|(?i:Wisc?|Wyo)")
        ABCOMP = "(?i:Inc|Cos?|Corp)|(?i:Pp?t)[ye](?i:s)?|(?i:Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys)"
        ABBREV1 = (rf"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|(?i:tel|est|ext|sq)"
                   rf"|(?i:Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq)|(?i:etc|al|seq|Bldg))\.")
        # abbreviations normally followed by a capitalized word: titles, single letters, acronyms
        ABTITLE = ("(?i:Mr|Mrs|Ms)|M(?i:iss)|(?i:Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
                   "|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
                   "|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc)")
        ABBREV4 = (rf"(?:{ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph)|{ACRO}"
                   r"|(?i:Invt|Elec|Natl)|(?i:M)[ft](?i:g)|(?i:Dept))")
        ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # only before a number
        PTY_CO = r"(?:(?i:pt)[eyEY]|(?i:co))\."
        # words after which an acronym's period also ends the sentence (case-sensitive first letter)
        SENT_START = "|".join(w[0] + (f"(?i:{w[1:]})" if len(w) > 1 else "") for w in (
            "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
            r"Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Their Then There These They This "
            "We When While What Yet You").split()) + "|" + SGML
        FILENAME_EXT = ("(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3"
                        "|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
        PHONE = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])[0-9]{3,4}"
                 r"[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
        QUOTE_CHARS = ("`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a"
                       "\u00ab\u00bb")
        MISC = ("+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
                "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
                "\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044"
                "\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f"
                "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65")
        keep, quote_l, quote_r = _keep, _map(lambda t: _quotes(t, True)), _map(lambda t: _quotes(t, False))
        soft = _map(_soft)

        # (regex, trailing context or None, action), in PTBLexer.flex's order (which breaks ties between rules)
        rules = [
            (r"(?i:c)\+\+", None, keep),
            (r"(?i:c|f)#", None, keep),
            (r"(?i:cannot)", None, _pushback(3)),  # can not
            (r"'(?i:twas)", None, _pushback(3)),  # 't was
            (r"'(?i:tis)", None, _pushback(2)),
            (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),  # gon na
            (SGML, None, _map(_nbsp)),
            (r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _map(lambda t: "--")),
            (r"&(?i:amp);", None, _map(_amp)),
            (r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, keep),
            (WORD, REDAUX, soft),  # it 's, man 's
            (SWORD, SREDAUX, soft),  # ca n't, do n't
            (WORD, None, soft),
            # words with apostrophes kept whole (APOWORD, one alternative per rule so the longest one wins)
            (f"{APOS}(?i:n){APOS}?", None, keep),
            (f"[lLdDjJ]{APOS}", None, keep),
            (f"(?i:Dunkin|somethin|ol){APOS}", None, keep),
            (f"{APOS}(?i:em|till?|cause)", None, keep),
            (f"[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*", None, keep),  # O'Neil (not I'll)
            (f"{APOS}[2-9]0(?i:s)", None, keep),  # '90s
            (f"{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*", None, keep),  # Hawai'i
            (r"(?i:cont'd)\.?|'(?i:twas)|(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", None, keep),
            (f"(?i:O){APOSETC}(?i:o)", None, keep),
            (f"(?i:y){APOS}", L, keep),  # y'all
            (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", None, keep),
            (r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
             r"(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None, keep),
            (r"(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
             r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:&(?i:gt);|>)?", None, keep),  # anything with an @ inside
            (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", None, keep),  # @name, #tag
            (REDAUX, "[^A-Za-z]", quote_r),
            (SREDAUX, "[^A-Za-z]", quote_r),
            (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", None, keep),  # dates
            (NUMBER, None, soft),
            (r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None, keep),
            (FRAC, None, _map(_nbsp)),
            ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, _map(lambda t: t.translate(_FRACTIONS))),
            (rf"(?i:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{APOS}n"
             rf"|c{APOS}est)", None, _map(_amp)),
            (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, keep),  # and/or
            (r"[A-Z]*\$|#", None, keep),
            ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None,
             _map(lambda t: t.translate(_CURRENCY))),
            (rf"{ACRO}\.", f"{SPACENL}+(?:{SENT_START}){SPACENL}", _acronym_ends_sentence),
            (ABBREV3, rf"{SPACENL}?\d", keep),  # no. 5
            (PTY_CO, f"{SPACE}(?i:ltd|lim)", keep),
            (ABBREV1, SENTEND, _period_again),
            (ABBREV1, r"[\s\S]{2}", keep),  # followed by anything else: mid-sentence
            (ABBREV1, None, _period_again),  # at the very end of the input
            (rf"{ABBREV4}\.", None, keep),  # mr. st. u.s.
            (ABBREV4, SPACE, keep),
            (ACRO, SPACENL, keep),
            (rf"{APOS}[0-9][0-9]", SPACENL, keep),
            (rf"{LETTER_DIGIT}+(?:\.{LETTER_DIGIT}+)*\.{FILENAME_EXT}", f"{SPACENL}|[.?!,]", keep),
            (rf"{WORD}\.", "[,;:\u3001]", soft),
            (PHONE, None, _map(lambda t: _parens(_nbsp(t)))),
            (r'"|&(?i:quot);', "[A-Za-z0-9$]", quote_l),  # opening double quote
            (r'"|&(?i:quot);', None, quote_r),
            ("\x7f", None, _drop),
            (r"<|&(?i:lt);", None, _map(lambda t: "<")),
            (r">|&(?i:gt);", None, _map(lambda t: ">")),
            (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", _map(_parens)),  # :) -> :-RRB-
            (r"[\^x=~<>]\.\[\^(?i:x)=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
             r"|\([\^x=~<>']-[\^x=~<>'`]\)", None, _map(_parens)),  # ^_^
            (r"[{}\[\]()]", None, _map(_BRACKETS.__getitem__)),
            (r"-+", None, _map(lambda t: "--" if 3 <= len(t) <= 4 else t)),
            (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", None, _map(lambda t: "...")),
            (r"@+|#+|_+", None, keep),
            (r"\*+|(?:\\\*){1,3}", None, keep),
            ("[,;:\u3001]", None, keep),
            (r"[?!]+", None, keep),
            ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, keep),
            (r"=", None, keep),
            (r"/", None, keep),
            (rf"{HTHING}\.", "[,;:\u3001]", soft),
            (HTHING, None, soft),  # t-shirt, 3-year-old
            (rf"{THING}\.", "[,;:\u3001]", keep),
            (THING, None, keep),  # 2nd, o'clock
            (rf"{THINGA}\.", "[,;:\u3001]", _map(_amp)),
            (THINGA, None, _map(_amp)),  # AT&T
            (r"'", "[A-Za-z][^ \t\n\r\u00a0]", quote_l),  # opening single quote
            (REDAUX, None, quote_r),
            (SREDAUX, None, quote_r),
            (f"&(?i:apos);|''|[{QUOTE_CHARS}]{{1,2}}|['\u0092\u2019]", None, quote_r),
            (r"<<|>>", None, keep),
            (f"[{MISC}]", None, keep),
            ("\x00|[ \t\u00a0\u2000-\u200a\u3000]+|[\u200b\u200e\u200f\ufeff]", None, _drop),
            (r"&(?i:nbsp);", None, _drop),
            (r"[\s\S]", None, _drop),  # untokenizable: Java deletes it (and warns once)
        ]
        self.rules = [(re.compile(rx if ctx is None else f"(?:{rx})(?=(?P<ctx>{ctx}))"), ctx is not None, act)
                      for rx, ctx, act in rules]
        # Fast path for a plain ASCII word before a space, a line end or a final ", " or ". ": no rule can make
        # it anything but one token unless it is split ("cannot") or is an abbreviation keeping its period.
        self.plain_word = re.compile(r"[A-Za-z]+(?=[.,]?(?:[ \t\n]|\Z))")
        self.split_words = {"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"}
        self.abbreviation = re.compile(rf"(?:{ABBREV1}|{ABBREV4}\.|{ABBREV3}|{PTY_CO})")
        # no other rule starts with " " or "\t", so the SPACES rule takes the whole run of spaces that follows
        # (a run starting with another space character can start a longer token, such as "\xa0x.com")
        self.spaces = re.compile("[ \t][ \t\u00a0\u2000-\u200a\u3000]*")
        self.plain_punct = re.compile(r"[.,](?=[ \t]*(?:\n|\Z))|,(?=[ \t])")  # a caption's final "." or a ", "

    def lex(self, text: str) -> list[list[str]]:
        """Raw lowercased tokens of each line of text (lines end at "\\n" only; see _texts)."""
        line: list[str] = []
        lines = [line]
        i, n = 0, len(text)
        plain_word, plain_punct, spaces, rules = self.plain_word, self.plain_punct, self.spaces, self.rules
        while i < n:
            c = text[i]
            if c == "\n":
                line = []
                lines.append(line)
                i += 1
                continue
            if c == " " or c == "\t":
                i = spaces.match(text, i).end()
                continue
            m = plain_word.match(text, i) or plain_punct.match(text, i)
            if m is not None:
                word, end = m.group(), m.end()
                if (word[0] not in ".," and (word.lower() in self.split_words or text.startswith(".", end) and (
                        len(word) == 1 or self.abbreviation.fullmatch(word + ".")))):
                    m = None  # leave it to the rules
                else:
                    line.append(word.lower())
                    i = end
                    continue
            best, best_len, best_action = None, 0, None
            for rx, has_ctx, action in rules:
                m = rx.match(text, i)
                if m is not None:
                    length = m.end("ctx") if has_ctx else m.end()
                    if length > best_len:
                        best, best_len, best_action = m, length, action
            tokens, consumed = best_action(best.group())
            line.extend(t.lower() for t in tokens)
            i += consumed
        return lines
