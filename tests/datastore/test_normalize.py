from retromem.datastore.normalize import NormalizeConfig, normalize


def test_nfc_composes_combining_marks():
    assert normalize("e\u0301te\u0301") == "\u00e9t\u00e9"


def test_newlines_unified():
    assert normalize("a\r\nb\rc\u2028d\u2029e\x85f") == "a\nb\nc\nd\ne\nf"


def test_control_characters_dropped_but_tab_and_newline_kept():
    assert normalize("a\x00b\x07c\td\ne\x1b[0m\x7f\x9b") == "abc\td\ne[0m"


def test_stages_can_be_switched_off():
    cfg = NormalizeConfig(nfc=False, newlines=False, control=False)
    text = "e\u0301\r\n\x07"
    assert normalize(text, cfg) == text


def test_ascii_shortcut_gives_the_full_normalization():
    """ASCII text skips the NFC and line-break scans unless it holds \\r: same result as doing all three."""
    import re
    import unicodedata

    def full(t: str) -> str:
        t = unicodedata.normalize("NFC", t)
        t = re.sub("\r\n|[\r\x85\u2028\u2029]", "\n", t)
        return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]", "", t)

    for t in ["plain", "a\r\nb\rc\n", "tab\tbell\x07 nul\x00 del\x7f", "e\u0301 \x85 \u2028 \u2029 x", "\r", "caf\u00e9\r\n"]:
        assert normalize(t) == full(t)
