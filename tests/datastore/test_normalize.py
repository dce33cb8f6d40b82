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
