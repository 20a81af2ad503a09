"""The kernel's cpulist syntax, as `smpd offline|online` read it."""

import pytest
from hypothesis import given, strategies as st

from smpd.cpulist import format_list, parse
from smpd.errors import BadInput


@pytest.mark.parametrize("text, cpus", [
    ("5", [5]), ("1-63", list(range(1, 64))), ("1,3,5-7", [1, 3, 5, 6, 7]),
    ("7,1-2,2", [1, 2, 7]), (" 3 ", [3]),
    ("1-9:1/2", [1, 3, 5, 7, 9]), ("0-1023:2/256", [0, 1, 256, 257, 512, 513, 768, 769]),
    ("0-5:2/3", [0, 1, 3, 4]), ("0-4:2/3", [0, 1, 3, 4]), ("0-3:2/3", [0, 1, 3]), ("2-4:1/1", [2, 3, 4]),
])
def test_parse_accepts_kernel_cpulists(text, cpus):
    assert parse(text) == cpus


@pytest.mark.parametrize("text, says", [
    ("5-2", "runs backwards"), ("1,,2", "item ''"), ("", "empty"), ("a", "item 'a'"),
    ("1-", "item '1-'"), ("-3", "item '-3'"), ("1-2-3", "item '1-2-3'"),
    ("1:1/2", "item '1:1/2'"), ("1-5:1", "item '1-5:1'"), ("1-5:/2", "item '1-5:/2'"),
    ("1-5:0/2", "group '0/2'"), ("1-5:3/2", "group '3/2'"), ("1-5:1/0", "group '1/0'"),
    ("0-N", "N and all only where the machine is known"), ("all", "item 'all'"),
    ("0-999999:1/2", "no machine has CPUs past 4095"), ("1,\u30002", "item '\u30002'"), ("\xa01", "item '\xa01'"),
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


def test_a_grouped_range_past_the_machine_is_refused_as_the_kernel_does():
    with pytest.raises(BadInput, match=r"range '1-40:1/2' ends at CPU 40, but this machine has CPUs 0-39"):
        parse("1-40:1/2", ncpus=40)  # selects 1-39 only, but bitmap_check_region() says ERANGE


def test_a_long_list_of_wide_ranges_costs_a_bitmap_per_item_not_a_cpu_each():
    """A 64 KiB soak record or argument of wide ranges is read at once: a set of every CPU of every
    item took seconds, and minutes with ranges to CPU 999999 (refused now)."""
    assert parse(",".join(["0-4095:1/2"] * 4800)) == list(range(0, 4096, 2))
    assert parse(",".join(["0-4095:64/128"] * 4800))[:65] == [*range(64), 128]


def test_spaces_around_items_and_all_in_any_case_are_read():
    assert parse("1, 3 ,ALL:1/4", ncpus=8) == [0, 1, 3, 4]


def test_n_and_all_are_the_machines_last_cpu_and_all_of_it():
    assert parse("1-N", ncpus=8) == list(range(1, 8))
    assert parse("all:1/2", ncpus=8) == [0, 2, 4, 6]
    assert parse("N", ncpus=64) == [63]


def test_grouped_format_writes_repeated_strides_as_one_range():
    assert format_list(list(range(1, 4096, 2)), grouped=True) == "1-4095:1/2"
    assert format_list([0, 1, 256, 257, 512, 513], grouped=True) == "0-513:2/256"
    assert format_list([1, 3], grouped=True) == "1,3"  # under three groups: plain ranges
    assert format_list([1, 3, 5, 7], grouped=True) == "1,3,5,7"  # not shorter grouped
    assert format_list([1, 3, 5]) == "1,3,5"  # the kernel's own form unless asked


@given(st.sets(st.integers(0, 300)))
def test_both_formats_parse_back_to_the_same_cpus(cpus):
    for grouped in (False, True):
        text = format_list(sorted(cpus), grouped=grouped)
        assert (parse(text) if text else []) == sorted(cpus)
