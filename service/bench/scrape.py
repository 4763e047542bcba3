"""Histogram quantiles from two scrapes of Prometheus endpoints: what happened between them.

The quantile is Prometheus's own ``histogram_quantile`` rule (linear within the bucket
that holds the rank), applied to the bucket counts the run added, summed over every
endpoint scraped (the API and each worker).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

# (histogram name, labels without "le") -> {upper bound: cumulative count}
Buckets = dict[tuple[str, tuple[tuple[str, str], ...]], dict[float, float]]


def scrape(urls: Iterable[str], client: httpx.Client) -> tuple[Buckets, list[str]]:
    """Bucket counts of every histogram at ``urls``, summed; and the urls that did not answer."""
    buckets: Buckets = defaultdict(lambda: defaultdict(float))
    missing = []
    for url in urls:
        try:
            response = client.get(url, timeout=10)
            response.raise_for_status()
        except httpx.HTTPError:
            missing.append(url)
            continue
        for family in text_string_to_metric_families(response.text):
            if family.type != "histogram":
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                    buckets[(family.name, labels)][float(sample.labels["le"])] += sample.value
    return buckets, missing


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` of cumulative bucket counts; None without observations."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the largest finite bucket: its bound is all one can say
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def added_quantiles(
    before: Buckets, after: Buckets, name: str, by: str = "", where: dict[str, str] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """p50/p95/p99 in ms and the count of ``name`` observed between the scrapes, by label ``by``
    ("all" when empty), over the series whose labels include ``where`` (the rest summed)."""
    added: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (family, labels), counts in after.items():
        if family != name or not (where or {}).items() <= dict(labels).items():
            continue
        key = dict(labels).get(by, "") if by else "all"
        earlier = before.get((family, labels), {})
        for bound, count in counts.items():
            added[key][bound] += count - earlier.get(bound, 0.0)
    report: dict[str, dict[str, float | int | None]] = {}
    for key, cumulative in sorted(added.items()):
        n = round(cumulative.get(math.inf, 0.0))
        if n == 0:
            continue
        report[key] = {"n": n, **{f"p{int(q * 100)}_ms": _ms(quantile(q, cumulative)) for q in (0.5, 0.95, 0.99)}}
    return report


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
