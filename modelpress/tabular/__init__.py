"""Data-free distillation of tabular models: TabKD (arXiv 2603.15481).

Pipeline: teacher (predict_proba / predict / torch module) + feature spec -> adaptive bins
aligned with the teacher's decision boundaries (`bins`) -> pairwise covering array over the
bins (`covering`) -> concrete queries + boundary refinement (`queries`) -> teacher soft labels
-> small student MLP or tree (`student`), orchestrated by `distill.distill`.
"""
from modelpress.tabular.distill import METHODS, DistillConfig, DistillResult, agreement, distill
from modelpress.tabular.spec import Feature, FeatureSpec, load_spec, spec_from_columns
from modelpress.tabular.teacher import Teacher, load_teacher, split_thresholds

__all__ = ["METHODS", "DistillConfig", "DistillResult", "agreement", "distill", "Feature", "FeatureSpec",
           "load_spec", "spec_from_columns", "Teacher", "load_teacher", "split_thresholds"]
