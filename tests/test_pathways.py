"""RNA expression to the 331 SurvPath pathway scores (mupad_core.rna)."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from mupad_core.models.conditioning import NUM_PATHWAYS, PathwayScoreEncoder
from mupad_core.rna import (
    ExpressionError,
    GeneSets,
    load_gene_sets,
    normalize_gene,
    pathway_scores,
    read_expression,
)
from mupad_core.rna.pathways import rank_rows

TCGA = "expression/tcga_blca_xena_rna_clean_first24.csv"


@pytest.fixture(scope="module")
def bundled() -> GeneSets:
    return load_gene_sets()


@pytest.fixture()
def tcga_path(shared_data):
    return shared_data / TCGA


@pytest.fixture()
def tcga(tcga_path) -> pd.DataFrame:
    return pd.read_csv(tcga_path, index_col=0)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- gene sets ------------------------------------------------------------------------


def test_bundled_gene_sets_are_the_331_survpath_pathways(bundled):
    resource = resources.files("mupad_core").joinpath("data/pathways/combine_signatures.csv")
    assert resource.is_file()
    assert len(bundled) == NUM_PATHWAYS == 331
    assert len(bundled.universe) == 4999
    assert sum(n.startswith("HALLMARK_") for n in bundled.names) == 50
    # column order of the file is the score order
    header = resource.read_text().splitlines()[0].split(",")
    assert list(bundled.names) == header
    assert bundled.names[0] == "ADP_signalling_through_P2Y_purinoceptor_12"
    sizes = {n: len(bundled[n]) for n in bundled.names}
    assert max(sizes.values()) == sizes["HALLMARK_COMPLEMENT"] == 199  # the file is 199 genes deep
    assert sizes["HALLMARK_HYPOXIA"] == 190 and min(sizes.values()) == 1


def test_bundled_file_is_byte_identical_to_survpath(shared_data):
    bundled_bytes = resources.files("mupad_core").joinpath("data/pathways/combine_signatures.csv").read_bytes()
    shared = (shared_data / "pathways/survpath/combine_signatures.csv").read_bytes()
    assert hashlib.sha1(bundled_bytes).hexdigest() == hashlib.sha1(shared).hexdigest()


def test_gene_x_pathway_matrix_gives_the_same_sets(shared_data, bundled):
    comps = load_gene_sets(shared_data / "pathways/survpath/combine_comps.csv")
    assert sorted(comps.names) == sorted(bundled.names)
    assert all(set(comps.keys(n)) == set(bundled.keys(n)) for n in bundled.names)


def test_gmt_gene_sets(tmp_path, bundled, tcga):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("".join(f"{n}\tfrom test\t" + "\t".join(bundled[n]) + "\n" for n in bundled.names))
    sets = load_gene_sets(gmt)
    assert sets.names == bundled.names
    assert all(sets[n] == bundled[n] for n in bundled.names)
    a = pathway_scores(tcga, sets).scores
    b = pathway_scores(tcga, bundled).scores
    pd.testing.assert_frame_equal(a, b)
    # a small GMT in lower case with Ensembl-style noise still matches symbols
    small = tmp_path / "small.gmt"
    small.write_text("HYPOXIA_FEW\tx\tldha\tpgk1\tslc2a1\nMADE_UP\tx\tNOTAGENE1\tNOTAGENE2\n")
    res = pathway_scores(tcga, small, min_genes_matched=1)
    assert list(res.scores.columns) == ["HYPOXIA_FEW", "MADE_UP"]
    assert res.report.per_pathway.loc["HYPOXIA_FEW", "n_matched"] == 3
    assert res.report.unmatched_pathways == ["MADE_UP"]
    assert (res.scores["MADE_UP"] == 0).all()


def test_bad_gmt_line_is_reported(tmp_path):
    bad = tmp_path / "bad.gmt"
    bad.write_text("ONLY_A_NAME\n")
    with pytest.raises(ExpressionError, match=r"bad\.gmt: line 1 is not GMT"):
        load_gene_sets(bad)


@pytest.mark.parametrize(
    "label, key",
    [
        ("tp53", "TP53"),
        (" Ldha ", "LDHA"),
        ("ENSG00000141510.16", "ENSG00000141510"),
        ("TP53|7157", "TP53"),
        ("?|100130426", None),
        ("RP11-34P13.7", "RP11-34P13.7"),  # a dot that is not an Ensembl version stays
        ("", None),
    ],
)
def test_gene_label_normalisation(label, key):
    assert normalize_gene(label) == key


# -- the method -------------------------------------------------------------------------


def test_rank_rows_matches_scipy():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (20, 300)).astype(float)  # many ties, as in sparse spots
    x[rng.random(x.shape) < 0.1] = np.nan
    ours, ref = rank_rows(x), rankdata(x, axis=1, nan_policy="omit")
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(ours[finite], ref[finite])


def test_rank_score_by_hand():
    table = pd.DataFrame([[1.0, 2, 3, 4, 5, 6], [0, 0, 0, 1, 0, 0]], index=["s1", "s2"], columns=list("ABCDEF"))
    sets = {"TOP": ["E", "F"], "A_ONLY": ["A"], "ALL": list("ABCDEF")}
    res = pathway_scores(table, sets, min_genes_matched=1)
    # s1: E, F rank 5, 6 of 6 -> u = 4.5/6, 5.5/6 -> 2 * mean - 1 = 2/3
    assert res.scores.loc["s1", "TOP"] == pytest.approx(2 / 3)
    assert res.scores.loc["s1", "A_ONLY"] == pytest.approx(2 * 0.5 / 6 - 1)
    assert res.scores.loc["s1", "ALL"] == pytest.approx(0.0)
    # s2: five tied zeros share rank 3 -> u = 2.5/6
    assert res.scores.loc["s2", "A_ONLY"] == pytest.approx(2 * 2.5 / 6 - 1)
    assert res.scores.loc["s2", "TOP"] == pytest.approx(2 * 2.5 / 6 - 1)


def test_tcga_cohort_scores(tcga_path, bundled):
    res = pathway_scores(tcga_path)
    scores, report = res.scores, res.report
    assert scores.shape == (24, 331)
    assert list(scores.columns) == list(bundled.names)
    assert scores.index[0] == "TCGA-MV-A51V"
    assert np.isfinite(scores.to_numpy()).all()
    assert (scores.abs() < 1).all().all()
    assert report.n_matched == 1577
    assert report.n_pathway_genes == 4999
    assert report.n_input_genes == 1577
    assert report.unmatched_pathways == []
    assert report.per_pathway.loc["HALLMARK_COMPLEMENT", "n_genes"] == 199
    assert 0 < report.per_pathway["coverage"].min() <= report.per_pathway["coverage"].max() == 1.0
    assert "1577 of 4999 pathway genes" in report.summary()
    assert "samples x genes" in report.orientation
    assert res.method == "rank" and scores.attrs["mupad_pathway_method"] == "rank"
    # scores carry signal: pathways differ from each other and samples differ within a pathway
    assert scores.mean().std() > 0.1
    assert (scores.std() > 0).mean() > 0.95


def test_a_single_profile_scores_the_same_alone_as_in_the_cohort(tcga_path, tcga):
    cohort = pathway_scores(tcga).scores
    for sample in ["TCGA-MV-A51V", tcga.index[13], tcga.index[-1]]:
        alone_file = pathway_scores(tcga_path, sample=sample).scores
        alone_series = pathway_scores(tcga.loc[sample]).scores
        assert alone_file.shape == (1, 331)
        np.testing.assert_allclose(alone_file.to_numpy(), cohort.loc[[sample]].to_numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(alone_series.to_numpy(), cohort.loc[[sample]].to_numpy(), rtol=0, atol=1e-12)
    shuffled = pathway_scores(tcga.sample(frac=1.0, random_state=1)).scores
    np.testing.assert_allclose(shuffled.loc[cohort.index].to_numpy(), cohort.to_numpy(), rtol=0, atol=1e-12)


def test_scale_does_not_matter_for_rank_scores(tcga):
    log_scores = pathway_scores(tcga).scores
    tpm = 2.0**tcga - 0.001  # Xena stores log2(TPM + 0.001)
    np.testing.assert_allclose(pathway_scores(tpm).scores.to_numpy(), log_scores.to_numpy(), rtol=0, atol=1e-12)


def test_cohort_z_method(tcga):
    res = pathway_scores(tcga, method="cohort-z")
    assert res.scores.shape == (24, 331)
    np.testing.assert_allclose(res.scores.mean().to_numpy(), 0.0, atol=1e-9)  # centred over the cohort
    with pytest.raises(ExpressionError, match="needs at least 2 samples or a reference"):
        pathway_scores(tcga.iloc[[0]], method="cohort-z")
    one = pathway_scores(tcga.iloc[[5]], method="cohort-z", reference=tcga).scores
    np.testing.assert_allclose(one.to_numpy(), res.scores.iloc[[5]].to_numpy(), atol=1e-12)


# -- matching and errors ----------------------------------------------------------------


def test_made_up_gene_names_fail_with_the_match_count(tmp_path):
    rng = np.random.default_rng(0)
    fake = pd.DataFrame(rng.normal(size=(3, 80)), index=["a", "b", "c"], columns=[f"GENEX{i}" for i in range(80)])
    # two real symbols among the made-up ones: the count must say 2, not 0
    fake = fake.rename(columns={"GENEX0": "TP53", "GENEX1": "ldha"})
    path = tmp_path / "madeup.csv"
    fake.to_csv(path)
    with pytest.raises(ExpressionError) as exc:
        pathway_scores(path)
    message = _one_line(exc)
    assert "madeup.csv" in message
    assert "2 of 4999 pathway genes matched (need at least 50); are the columns gene symbols?" in message
    assert isinstance(exc.value, ValueError)


def test_transposed_file_is_read_genes_as_rows(tmp_path, tcga):
    path = tmp_path / "genes_by_samples.tsv"
    tcga.T.to_csv(path, sep="\t")
    frame = read_expression(path)
    assert frame.shape == (24, 1577)
    assert "transposed" in frame.attrs["mupad_orientation"]
    pd.testing.assert_frame_equal(pathway_scores(path).scores, pathway_scores(tcga).scores, check_names=False)
    # forcing the wrong orientation fails clearly instead of scoring garbage
    with pytest.raises(ExpressionError, match=r"0 of 4999 pathway genes matched"):
        pathway_scores(path, orientation="samples_by_genes")


def test_transposed_dataframe_is_rejected_with_a_hint(tcga):
    with pytest.raises(ExpressionError) as exc:
        pathway_scores(tcga.T)
    message = _one_line(exc)
    assert "0 of 4999 pathway genes matched" in message
    assert "looks transposed" in message


def test_non_numeric_table_is_rejected(tmp_path, tcga):
    bad = tcga.iloc[:4, :100].copy()
    bad["LDHA"] = bad["LDHA"].astype(object)
    bad.iloc[2, bad.columns.get_loc("LDHA")] = "high"
    path = tmp_path / "text.csv"
    bad.to_csv(path)
    with pytest.raises(ExpressionError) as exc:
        read_expression(path)
    message = _one_line(exc)
    assert "text.csv" in message and "not numeric" in message and "LDHA" in message and "'high'" in message


def test_missing_sample_lists_available_ids(tcga_path):
    with pytest.raises(ExpressionError) as exc:
        pathway_scores(tcga_path, sample="TCGA-XX-0000")
    message = _one_line(exc)
    assert "TCGA-XX-0000" in message and "24 samples" in message and "TCGA-MV-A51V" in message


def test_nan_is_left_out_and_infinite_is_rejected(tcga, bundled):
    table = tcga.iloc[:3].copy()
    hypoxia = [g for g in bundled["HALLMARK_HYPOXIA"] if g in table.columns]
    dropped = hypoxia[:5]
    table.loc[table.index[0], dropped] = np.nan
    res = pathway_scores(table)
    assert np.isfinite(res.scores.to_numpy()).all()
    assert res.report.n_missing_values == 5
    # a NaN gene counts as not measured in that sample: same as scoring without the column
    alone = pathway_scores(table.iloc[[0]].drop(columns=dropped)).scores
    np.testing.assert_allclose(res.scores.iloc[[0]].to_numpy(), alone.to_numpy(), atol=1e-12)
    # a pathway whose only genes are all NaN in one sample scores 0 there and is counted
    one_gene = {"ONE": [hypoxia[0]], "REST": hypoxia[1:]}
    res = pathway_scores(table, one_gene, min_genes_matched=1)
    assert res.scores.loc[table.index[0], "ONE"] == 0.0
    assert res.report.n_zero_filled == 1
    table.iloc[1, 3] = np.inf
    with pytest.raises(ExpressionError, match="infinite value"):
        pathway_scores(table)


def test_duplicate_gene_columns_are_averaged(tcga):
    table = tcga.iloc[:4, :300].copy()
    extra = table[["LDHA"]].rename(columns={"LDHA": "ldha"}) + 1.0
    dup = pd.concat([table.drop(columns=["LDHA"]), table[["LDHA"]] - 1.0, extra], axis=1)
    res = pathway_scores(dup)
    assert res.report.n_duplicate_labels == 1
    np.testing.assert_allclose(res.scores.to_numpy(), pathway_scores(table).scores.to_numpy(), atol=1e-12)


def test_csv_variants_repeated_headers_and_r_style_row_names(tmp_path, tcga):
    table = tcga.iloc[:4, :300]
    expected = pathway_scores(table).scores.to_numpy()
    # the same header twice in a file (pandas would read the second as "LDHA.1")
    dup = pd.concat([table.drop(columns=["LDHA"]), table[["LDHA"]] - 1.0, table[["LDHA"]] + 1.0], axis=1)
    path = tmp_path / "dup.csv"
    dup.to_csv(path)
    assert path.read_text().splitlines()[0].count(",LDHA") == 2
    res = pathway_scores(path)
    assert res.report.n_duplicate_labels == 1 and res.report.n_input_genes == 300
    np.testing.assert_allclose(res.scores.to_numpy(), expected, atol=1e-12)
    # R's write.table: genes x samples, the header one field short, gzipped
    r_style = tmp_path / "r_style.txt.gz"
    lines = ["\t".join(table.index)] + [
        "\t".join([gene, *map(repr, table[gene].tolist())]) for gene in table.columns
    ]
    import gzip

    with gzip.open(r_style, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    frame = read_expression(r_style)
    assert list(frame.index) == list(table.index) and "transposed" in frame.attrs["mupad_orientation"]
    np.testing.assert_allclose(pathway_scores(r_style).scores.to_numpy(), expected, atol=1e-12)


# -- AnnData --------------------------------------------------------------------------


def test_h5ad_spots_sparse_match_the_csv(tmp_path, tcga):
    anndata = pytest.importorskip("anndata")
    from scipy import sparse

    counts = np.floor(2.0 ** (tcga.to_numpy() - 2)).astype(np.float32)  # spot-like counts, many zeros
    assert (counts == 0).mean() > 0.3
    spots = [f"AAACAAGTATCTCCCA-{i}" for i in range(len(tcga))]
    csv_path = tmp_path / "spots.csv"
    pd.DataFrame(counts, index=spots, columns=tcga.columns).to_csv(csv_path)
    # var_names are versioned Ensembl-like ids; symbols in var["gene_symbols"], lower case for half
    symbols = [g.lower() if i % 2 else g for i, g in enumerate(tcga.columns)]
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}.2" for i in range(len(symbols))], "gene_symbols": symbols})
    var.index = var["gene_ids"].to_numpy()
    adata = anndata.AnnData(
        X=sparse.csr_matrix(np.zeros_like(counts)),
        obs=pd.DataFrame(index=spots),
        var=var,
        layers={"counts": sparse.csr_matrix(counts)},
    )
    adata.X = sparse.csr_matrix(counts)
    h5ad = tmp_path / "spots.h5ad"
    adata.write_h5ad(h5ad)

    from_csv = pathway_scores(csv_path)
    from_h5ad = pathway_scores(h5ad)
    assert from_h5ad.report.n_matched == 1577
    assert "gene_symbols" in from_h5ad.report.orientation
    np.testing.assert_allclose(from_h5ad.scores.to_numpy(), from_csv.scores.to_numpy(), rtol=0, atol=1e-12)
    assert list(from_h5ad.scores.index) == spots
    # one spot alone, a named layer, and an in-memory AnnData give the same numbers
    one = pathway_scores(h5ad, sample=spots[3], layer="counts")
    np.testing.assert_allclose(one.scores.to_numpy(), from_csv.scores.iloc[[3]].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pathway_scores(adata).scores.to_numpy(), from_csv.scores.to_numpy(), atol=1e-12)
    with pytest.raises(ExpressionError, match="no layer 'tpm'; layers: \\['counts'\\]"):
        pathway_scores(h5ad, layer="tpm")
    with pytest.raises(ExpressionError, match="AAACAAGTATCTCCCA-0"):
        pathway_scores(h5ad, sample="nope")
    # forcing the Ensembl ids as gene labels finds nothing and says so
    with pytest.raises(ExpressionError, match="0 of 4999 pathway genes matched"):
        pathway_scores(h5ad, gene_column="var_names")


# -- into the model ---------------------------------------------------------------------


def test_scores_feed_the_pathway_encoder(tcga, bundled):
    res = pathway_scores(tcga)
    encoder = PathwayScoreEncoder(pathway_names=bundled.names)
    tokens = encoder.encode(res.scores).tokens
    assert tokens.shape == (24, 331, 1)
    np.testing.assert_allclose(tokens[..., 0].numpy(), res.to_numpy(), atol=1e-6)
    # a column shuffle is undone by name
    shuffled = res.scores[res.scores.columns[::-1]]
    assert (encoder.encode(shuffled).tokens == tokens).all()
    assert PathwayScoreEncoder().encode(res.to_numpy()).tokens.shape == (24, 331, 1)
