"""One formatter per kind of figure, as the CLI prints it."""
from decimal import Decimal
from types import SimpleNamespace

import pytest

from contract.placement import Placement
from orchestrator import format as fmt


@pytest.mark.parametrize("amount, text", [
    (Decimal("3.20"), "$3.20"), (3.2, "$3.20"), (1234.5, "$1,234.50"), (-0.32, "-$0.32"), (0, "$0.00"),
    (Decimal("-0.00"), "$0.00"), (Decimal("0.005"), "$0.01"),  # half up, as invoices round
])
def test_usd(amount, text):
    assert fmt.usd(amount) == text


@pytest.mark.parametrize("amount, text", [(0.4, "+$0.40"), (Decimal("-0.32"), "-$0.32"), (0, "+$0.00"),
                                          (1500, "+$1,500.00")])
def test_usd_signed(amount, text):
    assert fmt.usd_signed(amount) == text


@pytest.mark.parametrize("amount, text", [(12.345, "$12.35"), (0.00421, "$0.0042"), (Decimal("0.5"), "$0.5000"),
                                          (1, "$1.00")])
def test_usd_fine_keeps_four_decimals_under_a_dollar(amount, text):
    assert fmt.usd_fine(amount) == text


def test_rates_hours_durations_percentages_sizes():
    assert [fmt.rate(None), fmt.rate(Decimal("2.73")), fmt.rate(Decimal("0.41783"))] == ["-", "2.73", "0.418"]
    assert fmt.per_hour(Decimal("2.5")) == "$2.5000/h"
    assert [fmt.hours(0.4236), fmt.hours(99.994), fmt.hours(1234.4)] == ["0.42", "99.99", "1,234"]
    assert [fmt.duration(59.6), fmt.duration(61), fmt.duration(3600), fmt.duration(7322)] == ["1:00", "1:01", "1:00:00", "2:02:02"]
    assert [fmt.percent_change(3.2, 2.2), fmt.percent_change(1, 2), fmt.percent_change(1, 0)] == ["+45.5%", "-50.0%", "n/a"]
    assert [fmt.size(None), fmt.size(512), fmt.size(1_500_000), fmt.size(12 * 10**12)] == ["-", "512 B", "1.5 MB", "12,000.0 GB"]


def test_a_ledger_record_is_labelled_exactly_as_its_placement():
    placement = Placement(provider="aws", region="us-east-1", gpu="H100", gpu_count=2, spot=True,
                          price_per_hour=Decimal("4.1"))
    record = SimpleNamespace(provider="aws", region="us-east-1", gpu="H100", gpu_count=2, spot=True,
                             price_per_hour=Decimal("4.1"), n=1)
    assert fmt.placement_label(placement) == placement.label() == "aws/us-east-1 2xH100 spot at $4.10/h"
    assert fmt.placement_label(record) == placement.label()
    assert fmt.placement_label(record, with_price=False) == "aws/us-east-1 2xH100 spot"
    one = SimpleNamespace(provider="local", region="this-machine", gpu="CPU", gpu_count=1, spot=False, price_per_hour=1.5)
    assert fmt.placement_label(one) == "local/this-machine CPU at $1.50/h"


# ---- what a new user met in the first hour (issue 13) ---------------------------------------------------

@pytest.mark.parametrize("amount, text", [(Decimal("0.0001"), "$0.0001"), (50, "$50.00"), (Decimal("12.345"), "$12.345"),
                                          (Decimal("80"), "$80.00"), (Decimal("1234.5"), "$1,234.50")])
def test_usd_exact_never_rounds_a_given_amount_away(amount, text):
    assert fmt.usd_exact(amount) == text


@pytest.mark.parametrize("n, text", [(8_030_000_000, "8.03B"), (658_048, "658K"), (44_900, "44.9K"), (950, "950"),
                                     (15_360_000, "15.4M"), (None, "-")])
def test_count_says_large_figures_in_the_unit_that_reads(n, text):
    assert fmt.count(n) == text


def test_region_label_drops_the_empty_city_of_a_vast_region():
    assert [fmt.region_label(", CN, AS"), fmt.region_label("Texas, US, NA"), fmt.region_label("us-east-1")] == \
        ["CN, AS", "Texas, US, NA", "us-east-1"]


def test_cents_that_add_up_to_the_rounded_total():
    parts = [Decimal("0.3044"), Decimal("0.2941"), Decimal("0.0940")]
    assert [fmt.usd(p) for p in parts] == ["$0.30", "$0.29", "$0.09"]  # $0.68, under a $0.69 total
    assert fmt.cents_that_add_up(parts) == [Decimal("0.31"), Decimal("0.29"), Decimal("0.09")]


from hypothesis import given, strategies as st  # noqa: E402

_amounts = st.lists(st.decimals(min_value=Decimal("-1000"), max_value=Decimal("1000"), places=6), min_size=1, max_size=12)


@given(_amounts)
def test_rounded_parts_always_add_up_and_stay_within_a_cent(parts):
    rounded = fmt.cents_that_add_up(parts)
    total = sum(parts, Decimal(0)).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
    assert sum(rounded, Decimal(0)) == total
    assert all(abs(r - p) < Decimal("0.01") for r, p in zip(rounded, parts))


def test_phrases_break_between_phrases_only():
    text = fmt.phrases(["plan tiny-demo: tiny-llama lora, 536,886 tokens", "option 1 of 1: local CPU at $2.73/h",
                        "14,041 tokens/s", "expected $0.0336"], 50)
    assert text.splitlines() == ["plan tiny-demo: tiny-llama lora, 536,886 tokens",
                                 "  option 1 of 1: local CPU at $2.73/h",
                                 "  14,041 tokens/s · expected $0.0336"]
