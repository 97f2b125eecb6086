"""Small data sets shipped with fastgates, read from the installed package.

Nothing is downloaded: each data set is a CSV file in ``fastgates/data``,
read with :mod:`importlib.resources`, so it works offline and from a wheel.
"""

import csv
import importlib.resources
import io

import numpy as np

__all__ = ["load_sunspots"]

_SUNSPOTS = "sunspots.csv"


def _read_csv(name):
    """The rows of ``fastgates/data/<name>`` without its ``#`` comment lines.

    Returns ``(header, rows)``, the column names and the data rows as lists
    of strings.
    """
    resource = importlib.resources.files("fastgates").joinpath("data", name)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the data file fastgates/data/{name} is missing from the installed package "
            f"(looked in {resource}); reinstall fastgates") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    return rows[0], rows[1:]


def load_sunspots():
    """Yearly mean sunspot numbers, 1700 to 2008 (309 years).

    The numbers are those of the yearly sunspot data set that statsmodels
    ships (``statsmodels.datasets.sunspots``, column ``SUNACTIVITY``; copied
    from statsmodels 0.15.0), whose ``data.py`` states:

        COPYRIGHT: "This data is public domain."
        DESCRSHORT: "Yearly (1700-2008) data on sunspots from the National
        Geophysical Data Center."
        SOURCE: "http://www.ngdc.noaa.gov/stp/solar/solarda3.html"

    They are on the original Wolf/Zurich scale (version 1 of the
    international sunspot number: 190.2 in 1957; SILSO's 2015
    recalibration, version 2, is larger).  The series has the familiar
    cycle of about 11 years, with peaks of varying height.  The file is
    ``fastgates/data/sunspots.csv``; its header comment lines give the
    source and licence too.

    Returns
    -------
    years : ndarray
        ``(309,)`` int64, ``1700, 1701, ..., 2008``.
    values : ndarray
        ``(309,)`` float64, the yearly mean sunspot number of each year
        (non-negative; 0 in 1711 and 1712).

    Raises
    ------
    FileNotFoundError
        If the data file is missing from the installed package.

    Examples
    --------
    >>> from fastgates.datasets import load_sunspots
    >>> years, values = load_sunspots()
    >>> years[0], years[-1], values.shape
    (np.int64(1700), np.int64(2008), (309,))
    """
    header, rows = _read_csv(_SUNSPOTS)
    if header != ["year", "sunspots"]:
        raise ValueError(f"fastgates/data/{_SUNSPOTS}: expected the columns year,sunspots, got {header}")
    years = np.array([int(r[0]) for r in rows], dtype=np.int64)
    values = np.array([float(r[1]) for r in rows], dtype=np.float64)
    return years, values
