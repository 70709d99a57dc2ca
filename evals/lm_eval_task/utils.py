"""The harness's own HellaSwag document processing, re-exported for ``hellaswag_local.yaml``
(``!function utils.process_docs`` resolves relative to the yaml). Only ``lm_eval`` imports this."""

from lm_eval.tasks.hellaswag.utils import preprocess, process_docs  # noqa: F401
