"""The data sets shipped with the package (``fastgates.datasets``)."""

import importlib.resources

import numpy as np
import pytest

import fastgates as fg
from fastgates.datasets import load_sunspots


def test_sunspots_shape_and_dtypes():
    years, values = load_sunspots()
    assert years.shape == values.shape == (309,)
    assert years.dtype == np.int64
    assert values.dtype == np.float64


def test_sunspots_years_are_consecutive_1700_to_2008():
    years, _ = load_sunspots()
    np.testing.assert_array_equal(years, np.arange(1700, 2009))


@pytest.mark.parametrize("year, value", [
    (1700, 5.0),       # the first year
    (1711, 0.0),       # the Maunder-minimum tail: no spots at all
    (1778, 154.4),     # the highest before 1951
    (1870, 139.0),
    (1957, 190.2),     # the highest of the series (cycle 19)
    (2008, 2.9),       # the last year
])
def test_sunspots_known_values(year, value):
    years, values = load_sunspots()
    assert values[years == year].tolist() == [value]


def test_sunspots_are_finite_and_non_negative():
    _, values = load_sunspots()
    assert np.all(np.isfinite(values))
    assert values.min() == 0.0
    assert values.argmax() == 1957 - 1700


def test_sunspots_file_is_packaged_with_its_licence():
    text = importlib.resources.files("fastgates").joinpath("data", "sunspots.csv").read_text("utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("This data is public domain." in line for line in comments)
    assert any("ngdc.noaa.gov" in line for line in comments)
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rows[0] == "year,sunspots"
    assert len(rows) == 1 + 309


def test_sunspots_returns_fresh_arrays():
    _, values = load_sunspots()
    values[0] = -1.0
    assert load_sunspots()[1][0] == 5.0


def test_datasets_is_public():
    assert fg.datasets.load_sunspots is load_sunspots
    assert "datasets" in fg.__all__
