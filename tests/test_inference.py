"""Help texts that state each default once."""

from cli import Parser


def test_parser_shows_a_default_of_0(capsys):
    p = Parser(prog="x")
    p.add_argument("--n", type=int, default=0, help="how many")
    p.add_argument("--what", help="a path, or nothing")
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "how many (default: 0)" in text and "(default: None)" not in text
