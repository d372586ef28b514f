"""RNA conditioning inputs: expression tables to the 331 SurvPath pathway scores (see `pathways`)."""

from .pathways import (
    BUNDLED_GENE_SETS,
    DEFAULT_MIN_GENES_MATCHED,
    METHODS,
    PATHWAY_METHOD,
    ExpressionError,
    GeneSets,
    MatchReport,
    PathwayScores,
    bundled_gene_sets_path,
    load_gene_sets,
    normalize_gene,
    pathway_scores,
    read_expression,
)

__all__ = [
    "BUNDLED_GENE_SETS",
    "DEFAULT_MIN_GENES_MATCHED",
    "METHODS",
    "PATHWAY_METHOD",
    "ExpressionError",
    "GeneSets",
    "MatchReport",
    "PathwayScores",
    "bundled_gene_sets_path",
    "load_gene_sets",
    "normalize_gene",
    "pathway_scores",
    "read_expression",
]
