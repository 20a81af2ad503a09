"""The kernel's cpulist syntax, as `smpd offline|online` read it."""

import pytest

from smpd.cpulist import format_list, parse
from smpd.errors import BadInput


@pytest.mark.parametrize("text, cpus", [
    ("5", [5]), ("1-63", list(range(1, 64))), ("1,3,5-7", [1, 3, 5, 6, 7]),
    ("7,1-2,2", [1, 2, 7]), (" 3 ", [3]),
])
def test_parse_accepts_kernel_cpulists(text, cpus):
    assert parse(text) == cpus


@pytest.mark.parametrize("text, says", [
    ("5-2", "runs backwards"), ("1,,2", "item ''"), ("", "empty"), ("a", "item 'a'"),
    ("1-", "item '1-'"), ("-3", "item '-3'"), ("1-2-3", "item '1-2-3'"),
])
def test_parse_rejects_malformed_lists_naming_the_item(text, says):
    with pytest.raises(BadInput, match="cpulist") as e:
        parse(text)
    assert says in str(e.value)


def test_parse_rejects_cpus_beyond_the_machine():
    with pytest.raises(BadInput, match=r"names CPU 64,99, but this machine has CPUs 0-63"):
        parse("1,64,99", ncpus=64)


def test_format_is_the_inverse_of_parse():
    for text in ("1-63", "1,3,5-7", "0", "2-3,9-10"):
        assert format_list(parse(text)) == text
