"""Splitting one dataset into simulated sites.

Deterministic for a seed, so every simulation worker computes the same split
on its own and only the partition id has to travel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpriv.common import site_names
from fedpriv.common.errors import FedprivError


class PartitionError(FedprivError, ValueError):
    pass


def iid(num_rows: int, sites: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, sites)]


def dirichlet(
    labels: np.ndarray, sites: int, alpha: float, seed: int, min_rows: int = 1, attempts: int = 100
) -> list[np.ndarray]:
    """Label skew: each label's rows are shared among sites in Dirichlet(alpha) proportions.

    Draws again (same seed stream) until every site has `min_rows`, as
    flwr-datasets' DirichletPartitioner does; gives up with a clear error.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
        for label in classes:
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_rows:
            return result
    raise PartitionError(
        f"simulation.alpha={alpha} with {sites} sites leaves some site with fewer than "
        f"{min_rows} rows of {len(labels)} (data.min-rows); raise alpha or lower the number of sites"
    )


def column_site_names(values: Sequence[str], where: str = "simulation.column") -> dict[str, str]:
    """Each distinct value's site name (sorted by value): a file name under the site-name rule.

    A value is data, not a path: "../../x" or "federation" must not become
    one. Values are mapped to safe names; a value that maps to nothing, to a
    reserved name or to another value's name is refused.
    """
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for value in sorted(set(values)):
        name = site_names.from_value(value)
        if not name or name in site_names.RESERVED:
            raise PartitionError(
                f"{where}: value {value!r} cannot name a site (it becomes {name!r}; site names "
                f"{site_names.EXPLAINED}); rename it in the data"
            )
        if name in taken:
            raise PartitionError(
                f"{where}: values {taken[name]!r} and {value!r} would both be site {name!r}; "
                "rename one of them in the data"
            )
        names[value], taken[name] = name, value
    return names


def by_column(
    values: Sequence[str], sites: int, where: str = "simulation.column"
) -> tuple[list[np.ndarray], list[str]]:
    """One site per distinct value of a column (e.g. a department); sorted by value, named safely."""
    names = column_site_names(values, where)
    if len(names) != sites:
        raise PartitionError(
            f"simulation.column has {len(names)} distinct values but simulation.sites={sites}; "
            "set simulation.sites to the number of values"
        )
    column = np.asarray(values)
    return [np.flatnonzero(column == value) for value in names], list(names.values())


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_labels: int) -> np.ndarray:
    """Rows per (site, label): the skew a simulation actually has."""
    return np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])


def split_for(config, dataset, sites: int) -> tuple[list[np.ndarray], list[str]]:
    """The simulation's sites as `config.simulation` describes them: (row indices, site names).

    The one place both the harness (to show and check the split) and every
    simulated site (to take its share) cut the dataset.
    """
    from fedpriv.common.data import read_column

    sim = config.simulation
    if sim.partitioner == "column":
        values = read_column(dataset.source, sim.column, config.data.delimiter)
        return by_column(values, sites, f"{dataset.source}, column '{sim.column}' (simulation.column)")
    names = [f"site-{i:03d}" for i in range(sites)]
    if sim.partitioner == "iid":
        return iid(len(dataset), sites, config.seed), names
    return dirichlet(dataset.labels, sites, sim.alpha, config.seed, min_rows=config.data.min_rows), names
