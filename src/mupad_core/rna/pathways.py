"""RNA expression (bulk samples or spatial spots) to the 331 pathway scores MUPAD conditions on.

MUPAD compresses every RNA profile, bulk RNA-seq (TPM) and spatial-transcriptomics spots
alike, into 331 pathway-level scores with one function, using the SurvPath gene sets
(50 MSigDB Hallmarks + 281 Reactome/PARADIGM pathways, bundled with this package in
``mupad_core/data/pathways``). The paper calls these "enrichment scores" but does not say
how they are computed, so the method here is our choice:

Scoring method ``"rank"`` (the default, ``PATHWAY_METHOD``): a single-sample rank score.
For each profile (one row) on its own:

1. keep the genes that belong to at least one pathway and have a value in that row
   (NaN = not measured in that row);
2. rank them by expression, ties sharing their average rank, and turn rank ``r`` of ``n``
   genes into ``u = (r - 0.5) / n`` in (0, 1);
3. a pathway's score is ``2 * mean(u over its measured genes) - 1``, in (-1, 1): 0 for a
   set of genes placed at random, towards +1 when the set's genes are among the most
   expressed pathway genes of that profile, towards -1 when they are among the least.

Why: a user may have ONE spot or ONE bulk sample, and the score must not depend on what
else was in the file. Each row is scored from its own values only, so a profile scored
alone gets exactly the scores it gets inside a cohort (the tests check this). Ranks are
unchanged by any increasing transform, so TPM, log2(TPM + 1), Xena's log2(TPM + 0.001) or
normalised spot counts of one profile give the same scores and nobody has to guess the
scale; sparse spots with many zero counts are handled by tied ranks (all zeros share one
low rank). This is the idea of rank-based single-sample scores such as singscore
(Foroutan et al. 2018) without their set-size corrections. Ranking runs over the pathway
genes only (the 4,999 genes of the bundled sets), not over all genes in the file, so a
file restricted to pathway genes (as SurvPath's tables are) scores the same as the full
transcriptome it came from, as far as the same pathway genes were measured.

Scoring method ``"cohort-z"`` (optional): SurvPath standardises every gene across the
cohort before its pathway networks see it. This method z-scores each gene across a
reference cohort (``reference=``, or the scored samples themselves when at least two) and
averages the z-scores of a set's measured genes. Scores then describe a sample relative
to that cohort, so the same profile scores differently in another cohort; use it only
when the model was trained with it. It expects log-scale values (e.g. log2(TPM + 1)).

Gene matching: labels are compared case-insensitively after stripping white space, an
Ensembl version suffix (``ENSG00000141510.16`` -> ``ENSG00000141510``) and a TCGA-style
``|entrez`` suffix (``TP53|7157`` -> ``TP53``). Gene sets name genes by HGNC symbol, so
a table labelled by Ensembl id must provide symbols (an AnnData ``var`` column such as
``gene_symbols`` is picked up automatically). Columns that map to the same gene are
averaged. Too few matched genes raises `ExpressionError` ("N of M pathway genes matched").

Missing values: NaN means "not measured in this sample": the gene is left out of that
sample's ranking and of its pathway means. A pathway with no measured gene in a sample
(or no matched gene at all) scores 0, never NaN, and is listed in the `MatchReport`.
Infinite values are rejected.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PATHWAY_METHOD = "rank"
METHODS = ("rank", "cohort-z")
BUNDLED_GENE_SETS = "data/pathways/combine_signatures.csv"
DEFAULT_MIN_GENES_MATCHED = 50
ORIENTATIONS = ("auto", "samples_by_genes", "genes_by_samples")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$", re.IGNORECASE)
_GENE_COLUMN_HINTS = ("gene_symbols", "gene_symbol", "symbol", "gene_name", "gene_names", "feature_name")
_ROW_CHUNK = 2048


class ExpressionError(ValueError):
    """An expression table or gene-set file cannot be used; the message names the file."""


# -- gene symbols ---------------------------------------------------------------------


def normalize_gene(label: Any) -> str | None:
    """The matching key of a gene label: upper case, no Ensembl version, no ``|entrez``; None if empty."""
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return None
    key = str(label).strip()
    if "|" in key:  # TCGA legacy "SYMBOL|ENTREZ"; "?|100130426" has no symbol
        key = key.split("|", 1)[0].strip()
    match = _ENSEMBL_VERSION.match(key)
    if match:
        key = match.group(1)
    key = key.upper()
    return key if key and key not in {"?", "NAN", "NA", "NONE"} else None


# -- gene sets ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeneSets:
    """Named gene sets in a fixed order (the order of the score columns).

    names: pathway names in order. genes: name -> gene symbols as written in the source.
    source: where they came from (a path, or "bundled SurvPath signatures").
    """

    names: tuple[str, ...]
    genes: Mapping[str, tuple[str, ...]]
    source: str

    def __post_init__(self):
        keys = {n: list(dict.fromkeys(k for k in map(normalize_gene, self.genes.get(n, ())) if k)) for n in self.names}
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_universe", frozenset(k for ks in keys.values() for k in ks))
        if not self.names:
            raise ExpressionError(f"{self.source}: no gene sets")
        seen: set[str] = set()
        dups = [n for n in self.names if n in seen or seen.add(n)]
        if dups:
            raise ExpressionError(f"{self.source}: duplicate gene-set names {dups[:5]}")
        empty = [n for n in self.names if not self.keys(n)]
        if empty:
            raise ExpressionError(f"{self.source}: {len(empty)} gene sets have no genes, e.g. {empty[:3]}")

    @classmethod
    def from_dict(cls, sets: Mapping[str, Iterable[str]], source: str = "gene sets") -> GeneSets:
        return cls(tuple(sets), {name: tuple(str(g) for g in genes) for name, genes in sets.items()}, source)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self.genes[name]

    def keys(self, name: str) -> list[str]:
        """The set's distinct matching keys (see `normalize_gene`), in source order."""
        return list(self._keys[name])

    @property
    def universe(self) -> frozenset[str]:
        """Matching keys of every gene in any set."""
        return self._universe

    def membership(self, keys: Sequence[str]):
        """(len(keys), len(self)) sparse 0/1 matrix (scipy CSC): gene key i belongs to set j."""
        from scipy import sparse

        where = {k: i for i, k in enumerate(keys)}
        rows, cols = [], []
        for j, name in enumerate(self.names):
            hit = [where[k] for k in self._keys[name] if k in where]
            rows.extend(hit)
            cols.extend([j] * len(hit))
        data = np.ones(len(rows), dtype=np.float64)
        return sparse.csc_matrix((data, (rows, cols)), shape=(len(keys), len(self)))

    def __repr__(self) -> str:
        return f"GeneSets({len(self)} sets, {len(self.universe)} genes, source={self.source!r})"


def bundled_gene_sets_path():
    """The bundled SurvPath signatures (an importlib.resources Traversable)."""
    return resources.files("mupad_core").joinpath(BUNDLED_GENE_SETS)


@lru_cache(maxsize=1)
def _bundled() -> GeneSets:
    text = bundled_gene_sets_path().read_text(encoding="utf-8")
    return _parse_table_sets(text, ",", "bundled SurvPath signatures (mupad_core/" + BUNDLED_GENE_SETS + ")")


def load_gene_sets(path: str | Path | GeneSets | Mapping[str, Iterable[str]] | None = None) -> GeneSets:
    """Gene sets: the bundled 331 SurvPath pathways by default, or a user's file.

    Files: GMT (``.gmt``: name, description, genes, tab-separated, one set per line), or
    a CSV/TSV either in the bundled wide format (one column per set, gene symbols down
    the column, empty cells as padding) or as a gene x set 0/1 matrix (first column the
    genes, as SurvPath's ``combine_comps.csv``). A dict {name: genes} or a `GeneSets`
    is taken as is.
    """
    if path is None:
        return _bundled()
    if isinstance(path, GeneSets):
        return path
    if isinstance(path, Mapping):
        return GeneSets.from_dict(path)
    path = Path(path)
    if not path.is_file():
        raise ExpressionError(f"{path}: gene-set file not found")
    text = _read_text(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".gmt"):
        return _parse_gmt(text, str(path))
    return _parse_table_sets(text, _sniff_sep(name, text.split("\n", 1)[0]), str(path))


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpressionError(f"{path}: cannot read as text ({exc})") from exc


def _sniff_sep(name: str, first_line: str) -> str:
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    return "\t" if "\t" in first_line else ","


def _parse_gmt(text: str, source: str) -> GeneSets:
    sets: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        if len(fields) < 3 or not fields[0]:
            raise ExpressionError(f"{source}: line {lineno} is not GMT (name<TAB>description<TAB>genes...)")
        if fields[0] in sets:
            raise ExpressionError(f"{source}: gene set {fields[0]!r} appears twice (line {lineno})")
        sets[fields[0]] = tuple(g for g in fields[2:] if g)
    return GeneSets.from_dict(sets, source)


def _parse_table_sets(text: str, sep: str, source: str) -> GeneSets:
    rows = list(csv.reader(io.StringIO(text), delimiter=sep))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ExpressionError(f"{source}: no gene sets (need a header of set names and genes below)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    cells = {c.strip() for r in body for c in r[1:]}
    if cells and cells <= {"0", "1", "0.0", "1.0", ""}:  # gene x set membership matrix
        names = header[1:]
        sets = {n: [] for n in names}
        for r in body:
            for n, c in zip(names, r[1:]):
                if c.strip() in {"1", "1.0"}:
                    sets[n].append(r[0].strip())
        _check_names(names, source)
        return GeneSets.from_dict(sets, source)
    _check_names(header, source)
    sets = {n: [] for n in header}
    for r in body:
        for n, c in zip(header, r):
            if c.strip():
                sets[n].append(c.strip())
    return GeneSets.from_dict(sets, source)


def _check_names(names: Sequence[str], source: str) -> None:
    if any(not n for n in names):
        raise ExpressionError(f"{source}: a gene-set column has no name")
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise ExpressionError(f"{source}: duplicate gene-set names {dups[:5]}")


# -- reading expression ---------------------------------------------------------------


def _source_of(df: pd.DataFrame, default: str = "expression table") -> str:
    return str(df.attrs.get("mupad_source", default))


def _hits(labels: Iterable[Any], universe: frozenset[str]) -> int:
    return len({k for k in map(normalize_gene, labels) if k} & universe)


def read_expression(
    path: str | Path | Any,
    sample: str | Sequence[str] | None = None,
    *,
    orientation: str = "auto",
    layer: str | None = None,
    gene_column: str | None = None,
    gene_sets: GeneSets | str | Path | None = None,
    only_pathway_genes: bool = False,
) -> pd.DataFrame:
    """An expression table as a samples (or spots) x genes float DataFrame.

    path: a CSV/TSV (optionally .gz) or an AnnData ``.h5ad`` file, or an AnnData object.
    CSV/TSV: one label column then numbers. ``orientation="auto"`` compares how many
    column labels and how many row labels are pathway gene symbols and takes the better
    one as the genes (ties: columns are genes); ``"samples_by_genes"`` or
    ``"genes_by_samples"`` forces it. AnnData: samples/spots in ``obs``; gene labels from
    ``var_names`` or the ``var`` column (``gene_column``, else the best-matching text column,
    e.g. ``gene_symbols``); values from ``.X`` (dense or sparse) or ``layers[layer]``.
    sample: one id (or a list) to keep; the rest are not loaded into the result.
    only_pathway_genes: drop genes in no gene set (keeps a large spot matrix small).

    What was chosen is recorded in ``df.attrs``: ``mupad_source``, ``mupad_orientation``.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    sets = load_gene_sets(gene_sets)
    universe = sets.universe
    if not isinstance(path, (str, Path)):
        if hasattr(path, "obs_names") and hasattr(path, "var_names"):
            return _from_anndata(path, "AnnData", sample, orientation, layer, gene_column, universe, only_pathway_genes)
        raise TypeError(f"expected a file path or an AnnData object, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ExpressionError(f"{path}: expression file not found")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        try:
            import anndata
        except ImportError as exc:  # pragma: no cover - anndata is a dependency
            raise ExpressionError(f"{path}: reading .h5ad needs anndata (pip install anndata)") from exc
        try:
            adata = anndata.read_h5ad(path)
        except Exception as exc:
            raise ExpressionError(f"{path}: cannot read as AnnData ({type(exc).__name__}: {exc})") from exc
        return _from_anndata(adata, str(path), sample, orientation, layer, gene_column, universe, only_pathway_genes)
    if layer is not None or gene_column is not None:
        raise ExpressionError(f"{path}: layer= and gene_column= apply to .h5ad files only")
    return _from_table(path, sample, orientation, universe, only_pathway_genes)


def _from_table(
    path: Path, sample, orientation: str, universe: frozenset[str], only_pathway_genes: bool
) -> pd.DataFrame:
    name = path.name.lower().removesuffix(".gz")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            first = fh.readline()
        sep = _sniff_sep(name, first)
        table = pd.read_csv(path, sep=sep, low_memory=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ExpressionError(f"{path}: cannot read as a delimited table ({type(exc).__name__}: {exc})") from exc
    n_index = 0
    if not isinstance(table.index, pd.RangeIndex):  # R-style header: one field short, row names unlabelled
        n_index = table.index.nlevels
        table = table.reset_index()
        table.columns = [f"Unnamed: {j}" if j < n_index else c for j, c in enumerate(table.columns)]
    # pandas renames repeated header names ("LDHA", "LDHA.1"); restore them so duplicates merge by gene
    raw = next(csv.reader([first.rstrip("\r\n")], delimiter=sep), [])
    if len(raw) == table.shape[1] - n_index:
        table.columns = list(table.columns[:n_index]) + [
            r.strip() if r.strip() else c for r, c in zip(raw, table.columns[n_index:])
        ]
    if table.shape[1] < 2 or table.shape[0] < 1:
        raise ExpressionError(f"{path}: expected a label column and at least one column of numbers")
    # Leading text columns are labels (sample ids, or gene ids/symbols); the rest must be numbers.
    numeric = [_is_number_dtype(t) for t in table.dtypes]
    n_labels = 0
    for j, (col, is_number) in enumerate(zip(table.columns, numeric)):
        if is_number and not (j == 0 and str(col).startswith("Unnamed:")):  # an unnamed first column = row ids
            break
        n_labels += 1
    labels, data = table.iloc[:, :n_labels], table.iloc[:, n_labels:]
    if data.shape[1] == 0:
        bad = table.columns[min(1, n_labels - 1)]
        raise ExpressionError(f"{path}: no numeric columns; column {bad!r} holds text ({_first_text(table[bad])!r})")
    bad = [c for c, is_number in zip(data.columns, numeric[n_labels:]) if not is_number]
    if bad:
        raise ExpressionError(
            f"{path}: the table is not numeric: {len(bad)} columns hold text, e.g. {bad[0]!r} "
            f"({_first_text(data[bad[0]])!r}); expected label column(s) followed by numbers"
        )
    col_hits = _hits(data.columns, universe)
    row_hits = {c: _hits(labels[c], universe) for c in labels.columns}
    best_row = max(row_hits, key=row_hits.get) if row_hits else None
    best_row_hits = row_hits.get(best_row, 0)
    auto_rows = orientation == "auto" and best_row is not None and best_row_hits > col_hits
    genes_as_rows = orientation == "genes_by_samples" or auto_rows
    if genes_as_rows:
        if best_row is None:
            raise ExpressionError(f"{path}: genes_by_samples needs a first column of gene labels")
        gene_col = best_row if best_row_hits else labels.columns[0]
        frame = pd.DataFrame(
            data.to_numpy(np.float64).T, index=data.columns.astype(str), columns=labels[gene_col].astype(str)
        )
        note = (
            f"genes x samples, transposed: {row_hits.get(gene_col, 0)} pathway genes among the row labels "
            f"(column {gene_col!r}), {col_hits} among the column labels"
        )
    else:
        if n_labels:
            first = labels.columns[0]
            index_name = None if str(first).startswith("Unnamed:") else str(first)
            index = pd.Index(labels[first].astype(str).to_numpy(), name=index_name)
        else:
            index = pd.RangeIndex(len(data)).astype(str)
        frame = pd.DataFrame(data.to_numpy(np.float64), index=index, columns=data.columns.astype(str))
        note = (
            f"samples x genes: {col_hits} pathway genes among the column labels, "
            f"{best_row_hits} among the row labels"
        )
    return _finish(frame, str(path), note, sample, universe, only_pathway_genes)


def _is_number_dtype(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _first_text(series: pd.Series) -> Any:
    for v in series:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                return v
    return series.iloc[0]


def _from_anndata(
    adata, source: str, sample, orientation: str, layer, gene_column, universe: frozenset[str], only_pathway_genes: bool
) -> pd.DataFrame:
    if layer is not None:
        if layer not in adata.layers:
            raise ExpressionError(f"{source}: no layer {layer!r}; layers: {list(adata.layers) or 'none'}")
        matrix = adata.layers[layer]
    else:
        matrix = adata.X
        if matrix is None:
            raise ExpressionError(f"{source}: .X is empty; name a layer ({list(adata.layers) or 'none present'})")
    candidates: dict[str, pd.Index] = {"var_names": adata.var_names}
    for col in adata.var.columns:
        if not pd.api.types.is_numeric_dtype(adata.var[col]):
            candidates[f"var[{col!r}]"] = pd.Index(adata.var[col].astype(str))
    if gene_column is not None:
        key = "var_names" if gene_column == "var_names" else f"var[{gene_column!r}]"
        if key not in candidates:
            raise ExpressionError(
                f"{source}: no text var column {gene_column!r}; var columns: {list(adata.var.columns) or 'none'}"
            )
        chosen = key
    else:  # most pathway genes wins; ties keep var_names, then the usual symbol columns
        def preference(k: str) -> tuple[bool, bool]:
            return k != "var_names", not any(h in k.lower() for h in _GENE_COLUMN_HINTS)

        order = sorted(candidates, key=preference)
        chosen = max(order, key=lambda k: _hits(candidates[k], universe))
    gene_hits = _hits(candidates[chosen], universe)
    obs_hits = _hits(adata.obs_names, universe)
    auto_transpose = orientation == "auto" and gene_column is None and obs_hits > gene_hits
    transpose = orientation == "genes_by_samples" or auto_transpose
    if transpose:
        genes, samples = pd.Index(adata.obs_names.astype(str)), pd.Index(candidates[chosen])
        note = f"genes in obs, samples in var (transposed): {obs_hits} pathway genes among obs_names"
    else:
        genes, samples = pd.Index(candidates[chosen]), pd.Index(adata.obs_names.astype(str))
        others = ", ".join(f"{k} {_hits(v, universe)}" for k, v in candidates.items() if k != chosen)
        note = f"obs x var: genes from {chosen} ({gene_hits} pathway genes" + (f"; {others}" if others else "") + ")"
    rows = _select(samples, sample, source)
    keys = [normalize_gene(g) for g in genes]
    cols = np.arange(len(genes))
    if only_pathway_genes:
        cols = np.flatnonzero([k in universe for k in keys])
    first, second = (cols, rows) if transpose else (rows, cols)
    sub = matrix[first][:, second]  # one axis at a time: works for numpy and scipy.sparse alike
    dense = sub.toarray() if hasattr(sub, "toarray") else np.asarray(sub)
    dense = dense.T if transpose else dense
    try:
        values = dense.astype(np.float32 if dense.dtype in (np.float32, np.float16) else np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise ExpressionError(f"{source}: the expression matrix is not numeric ({dense.dtype})") from exc
    frame = pd.DataFrame(values, index=samples[rows], columns=genes[cols])
    frame = _finish(frame, source, note, None, universe, False)
    frame.attrs["mupad_n_genes"] = len({k for k in keys if k})
    return frame


def _select(index: pd.Index, sample, source: str) -> np.ndarray:
    if sample is None:
        return np.arange(len(index))
    wanted = [sample] if isinstance(sample, (str, int, np.integer)) else list(sample)
    ids = index.astype(str)
    rows, missing = [], []
    for w in wanted:
        hit = np.flatnonzero(ids == str(w))
        if len(hit):
            rows.extend(hit)
        else:
            missing.append(w)
    if missing:
        examples = ", ".join(map(str, ids[:5]))
        raise ExpressionError(
            f"{source}: sample {missing[0]!r} not found among {len(ids)} samples (e.g. {examples})"
            + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else "")
        )
    return np.asarray(rows, dtype=np.int64)


def _finish(frame: pd.DataFrame, source: str, note: str, sample, universe, only_pathway_genes: bool) -> pd.DataFrame:
    if sample is not None:
        frame = frame.iloc[_select(frame.index, sample, source)]
    keys = [normalize_gene(g) for g in frame.columns]
    n_genes = len({k for k in keys if k})
    if only_pathway_genes:
        frame = frame.loc[:, [k in universe for k in keys]]
    frame.attrs["mupad_source"] = source
    frame.attrs["mupad_n_genes"] = n_genes
    frame.attrs["mupad_orientation"] = note
    return frame


# -- scoring --------------------------------------------------------------------------


@dataclass
class MatchReport:
    """How the expression table met the gene sets.

    n_input_genes: distinct gene keys in the table. n_pathway_genes: distinct genes across
    the sets. n_matched: pathway genes found in the table. per_pathway: for each set (in
    score order) n_genes, n_matched, coverage = n_matched / n_genes, and unmatched (no gene
    found: the pathway scores 0 in every sample). n_zero_filled: further (sample, pathway)
    scores set to 0 because none of the pathway's matched genes had a value (all NaN) in
    that sample.
    """

    source: str
    method: str
    n_samples: int
    n_input_genes: int
    n_pathway_genes: int
    n_matched: int
    per_pathway: pd.DataFrame
    n_duplicate_labels: int = 0
    n_missing_values: int = 0
    n_zero_filled: int = 0
    orientation: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def matched_fraction(self) -> float:
        return self.n_matched / self.n_pathway_genes if self.n_pathway_genes else 0.0

    @property
    def unmatched_pathways(self) -> list[str]:
        return list(self.per_pathway.index[self.per_pathway["unmatched"]])

    def summary(self) -> str:
        cov = self.per_pathway["coverage"]
        lines = [
            f"{self.source}: {self.n_samples} samples, method {self.method!r}",
            f"genes matched: {self.n_matched} of {self.n_pathway_genes} pathway genes "
            f"({100 * self.matched_fraction:.1f}%); {self.n_input_genes} distinct genes in the table",
            f"pathway coverage: median {cov.median():.2f}, min {cov.min():.2f}; "
            f"{int((cov < 0.25).sum())} of {len(cov)} pathways below 25%",
        ]
        if self.unmatched_pathways:
            names = ", ".join(self.unmatched_pathways[:5])
            lines.append(f"{len(self.unmatched_pathways)} pathways with no matched gene score 0: {names}")
        if self.orientation:
            lines.append(f"read as {self.orientation}")
        if self.n_duplicate_labels:
            lines.append(f"{self.n_duplicate_labels} columns duplicated another gene and were averaged")
        if self.n_missing_values:
            lines.append(f"{self.n_missing_values} missing values (NaN) among matched genes, left out")
        if self.n_zero_filled:
            lines.append(f"{self.n_zero_filled} further sample x pathway scores set to 0 (their genes are NaN there)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class PathwayScores:
    """Samples x pathways scores (columns in gene-set order) and the match report."""

    scores: pd.DataFrame
    report: MatchReport

    @property
    def method(self) -> str:
        return self.report.method

    @property
    def pathway_names(self) -> list[str]:
        return list(self.scores.columns)

    def to_numpy(self) -> np.ndarray:
        """(samples, pathways) float32, the array `PathwayScoreEncoder.encode` takes."""
        return self.scores.to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.scores)


def pathway_scores(
    expression: pd.DataFrame | pd.Series | str | Path | Any,
    gene_sets: GeneSets | str | Path | Mapping[str, Iterable[str]] | None = None,
    *,
    min_genes_matched: int = DEFAULT_MIN_GENES_MATCHED,
    method: str = PATHWAY_METHOD,
    reference: pd.DataFrame | None = None,
    sample: str | Sequence[str] | None = None,
    **read_kwargs: Any,
) -> PathwayScores:
    """Score every sample (row) of an expression table on every gene set.

    expression: a samples x genes DataFrame (as `read_expression` returns), one profile as
    a Series indexed by gene, a file path (read with `read_expression`, passing
    ``sample`` and ``read_kwargs``) or an AnnData object. gene_sets: the bundled 331
    SurvPath pathways by default. min_genes_matched: fewer pathway genes found than this
    raises `ExpressionError`. method: ``"rank"`` (single-sample, default) or ``"cohort-z"``
    (see the module docstring); reference: the cohort for ``"cohort-z"``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sets = load_gene_sets(gene_sets)
    if isinstance(expression, (str, Path)) or (hasattr(expression, "obs_names") and hasattr(expression, "var_names")):
        expression = read_expression(expression, sample, gene_sets=sets, only_pathway_genes=True, **read_kwargs)
    else:
        if read_kwargs:
            raise TypeError(f"{sorted(read_kwargs)} apply when reading a file or AnnData, not to an in-memory table")
        if sample is not None:
            if not isinstance(expression, pd.DataFrame):
                raise TypeError("sample= picks rows of a DataFrame, a file or AnnData")
            expression = expression.iloc[_select(expression.index, sample, _source_of(expression))]
    if isinstance(expression, pd.Series):
        attrs = dict(expression.attrs)
        expression = expression.to_frame(name=expression.name if expression.name is not None else "sample").T
        expression.attrs.update(attrs)
    if not isinstance(expression, pd.DataFrame):
        raise TypeError(
            f"expected a DataFrame (samples x genes), a Series, a path or AnnData, got {type(expression).__name__}; "
            "a bare array has no gene labels"
        )
    source = _source_of(expression)
    if expression.shape[0] == 0:
        raise ExpressionError(f"{source}: no samples in the expression table")
    universe = sets.universe
    values, keys, n_input, n_dups = _matched_matrix(expression, universe, source)
    n_matched = len(keys)
    if n_matched < min_genes_matched:
        row_hits = _hits(expression.index, universe)
        hint = (
            f"; the row labels match {row_hits} pathway genes, so the table looks transposed (genes as rows): "
            "pass it as samples x genes (e.g. expression.T)"
            if row_hits > n_matched
            else ""
        )
        raise ExpressionError(
            f"{source}: {n_matched} of {len(universe)} pathway genes matched (need at least {min_genes_matched}); "
            f"are the columns gene symbols?{hint}"
        )
    finite = ~np.isnan(values)
    measured = finite.sum(axis=1)
    if (measured < min(min_genes_matched, n_matched)).any():
        i = int(np.argmin(measured))
        raise ExpressionError(
            f"{source}: sample {expression.index[i]!r} has values for only {int(measured[i])} of the "
            f"{n_matched} matched pathway genes (the rest are NaN; need at least {min(min_genes_matched, n_matched)})"
        )
    member = sets.membership(keys)
    notes: list[str] = []
    if method == "rank":
        scores, counts = _rank_scores(values, member)
    else:
        ref = _reference_matrix(reference, keys, universe, values, source)
        scores, counts = _cohort_z_scores(values, ref, member)
        vmax = np.nanmax(values)
        if np.nanmin(values) >= 0 and vmax > 100:
            notes.append(
                f"values look linear-scale (max {vmax:.0f}); cohort-z expects log-scale values such as log2(TPM+1)"
            )
    n_set_genes = np.array([len(sets.keys(n)) for n in sets.names])  # distinct genes per set
    n_set_matched = np.asarray(member.sum(axis=0)).ravel().astype(int)
    per_pathway = pd.DataFrame(
        {
            "n_genes": n_set_genes,
            "n_matched": n_set_matched,
            "coverage": n_set_matched / n_set_genes,
            "unmatched": n_set_matched == 0,
        },
        index=pd.Index(sets.names, name="pathway"),
    )
    report = MatchReport(
        source=source,
        method=method,
        n_samples=len(expression),
        n_input_genes=int(expression.attrs.get("mupad_n_genes", n_input)),
        n_pathway_genes=len(universe),
        n_matched=n_matched,
        per_pathway=per_pathway,
        n_duplicate_labels=n_dups,
        n_missing_values=int((~finite).sum()),
        n_zero_filled=int((counts[:, n_set_matched > 0] == 0).sum()),
        orientation=expression.attrs.get("mupad_orientation"),
        notes=notes,
    )
    frame = pd.DataFrame(scores, index=expression.index.copy(), columns=pd.Index(sets.names, name="pathway"))
    frame.attrs.update(mupad_source=source, mupad_pathway_method=method, mupad_gene_sets=sets.source)
    return PathwayScores(frame, report)


def _matched_matrix(
    expression: pd.DataFrame, universe: frozenset[str], source: str
) -> tuple[np.ndarray, list[str], int, int]:
    """(samples, matched genes) float64 values, their keys, distinct input genes, duplicates merged."""
    keys = [normalize_gene(c) for c in expression.columns]
    n_input = len({k for k in keys if k})
    keep = [i for i, k in enumerate(keys) if k in universe]
    sub = expression.iloc[:, keep]
    for j, dtype in enumerate(sub.dtypes):
        if not _is_number_dtype(dtype):
            col = sub.columns[j]
            raise ExpressionError(
                f"{source}: the table is not numeric (column {col!r} holds {dtype} values, "
                f"e.g. {_first_text(sub.iloc[:, j])!r})"
            )
    # float32 tables (AnnData spots) stay float32 to halve memory; ranks are computed in float64.
    dtype = np.float32 if len(keep) and all(t == np.float32 for t in sub.dtypes) else np.float64
    values = sub.to_numpy(dtype) if len(keep) else np.zeros((len(expression), 0))
    if np.isinf(values).any():
        r, c = np.argwhere(np.isinf(values))[0]
        raise ExpressionError(f"{source}: infinite value in sample {expression.index[r]!r}, gene {sub.columns[c]!r}")
    kept = [keys[i] for i in keep]
    # Columns still all-NaN were not measured at all: they do not count as matched.
    present = ~np.isnan(values).all(axis=0)
    values, kept = values[:, present], [k for k, p in zip(kept, present) if p]
    uniq = list(dict.fromkeys(kept))
    n_dups = len(kept) - len(uniq)
    if n_dups:  # average columns that map to the same gene (NaN-aware)
        pos = {k: i for i, k in enumerate(uniq)}
        idx = np.array([pos[k] for k in kept])
        total = np.zeros((len(values), len(uniq)))
        count = np.zeros((len(values), len(uniq)))
        fin = ~np.isnan(values)
        np.add.at(total.T, idx, np.where(fin, values, 0.0).T)
        np.add.at(count.T, idx, fin.T.astype(float))
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return values, uniq, n_input, n_dups


def rank_rows(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n within each row, ties sharing their average rank; NaN ranks after every number.

    Equals ``scipy.stats.rankdata(values, axis=1)`` on the finite entries (without importing
    scipy.stats, which takes about a second).
    """
    values = np.atleast_2d(values)
    rows, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")  # NaN sorts last; stable sort copes with runs of zeros
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.empty(ordered.shape, dtype=bool)  # where a run of equal values begins
    starts[:, 0] = True
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts[:, 1:])
    flat = starts.ravel()
    run = np.cumsum(flat) - 1
    begin = np.flatnonzero(flat)
    size = np.diff(np.append(begin, flat.size))
    average = (begin % n) + 1 + (size - 1) / 2.0  # mean of the 1-based positions the run covers
    ranks = np.empty(ordered.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, average[run].reshape(rows, n), axis=1)
    return ranks


def _rank_scores(values: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-sample rank scores in (-1, 1) and the per-(sample, set) count of measured genes."""
    scores = np.zeros((len(values), member.shape[1]))
    counts = np.zeros_like(scores)
    for start in range(0, len(values), _ROW_CHUNK):
        block = values[start : start + _ROW_CHUNK]
        finite = ~np.isnan(block)
        n = finite.sum(axis=1, keepdims=True)
        ranks = rank_rows(block)
        u = np.where(finite, (ranks - 0.5) / np.maximum(n, 1), 0.0)
        c = np.asarray(member.T @ finite.T.astype(np.float64)).T  # sparse on the left: scipy's fast path
        s = np.asarray(member.T @ u.T).T
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[start : start + len(block)] = np.where(c > 0, 2.0 * s / np.maximum(c, 1) - 1.0, 0.0)
        counts[start : start + len(block)] = c
    return scores, counts


def _reference_matrix(reference, keys, universe, values, source) -> np.ndarray:
    if reference is None:
        if len(values) < 2:
            raise ExpressionError(
                f"{source}: method 'cohort-z' needs at least 2 samples or a reference cohort (reference=); "
                "for a single profile use method='rank'"
            )
        return values
    if not isinstance(reference, pd.DataFrame):
        raise TypeError(f"reference must be a samples x genes DataFrame, got {type(reference).__name__}")
    ref_values, ref_keys, _, _ = _matched_matrix(reference, universe, _source_of(reference, "reference table"))
    pos = {k: i for i, k in enumerate(ref_keys)}
    out = np.full((len(ref_values), len(keys)), np.nan)
    for j, k in enumerate(keys):
        if k in pos:
            out[:, j] = ref_values[:, pos[k]]
    return out


def _cohort_z_scores(values: np.ndarray, ref: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-gene z-score (across the reference) over each set's measured genes."""
    values, ref = np.asarray(values, np.float64), np.asarray(ref, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        counts_ref = (~np.isnan(ref)).sum(axis=0)
        mean = np.where(counts_ref > 0, np.nansum(ref, axis=0) / np.maximum(counts_ref, 1), np.nan)
        var = np.nansum((ref - mean) ** 2, axis=0) / np.maximum(counts_ref, 1)
        sd = np.sqrt(var)
        z = np.where(sd > 0, (values - mean) / np.where(sd > 0, sd, 1.0), 0.0)
    z = np.where(np.isnan(values) | np.isnan(mean), np.nan, z)
    finite = ~np.isnan(z)
    c = np.asarray(member.T @ finite.T.astype(np.float64)).T
    s = np.asarray(member.T @ np.where(finite, z, 0.0).T).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), 0.0), c
