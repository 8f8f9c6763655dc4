"""MLflow pyfunc *model from code* for a drugprot ensemble: this file is the model.

``drugprot.ensemble.publish`` logs it with ``mlflow.pyfunc.log_model(python_model=<this file's path>,
artifacts={"ensemble": <ensemble folder>})``: MLflow stores the file's source and the folder (safetensors,
tokenizers, JSON, sha256 manifest), never a pickled object. On load, MLflow runs this file, which hands
``set_model`` the class below; ``load_context`` verifies and loads the folder through the one inference path
(``drugprot.inference.loading.Predictor.from_ensemble``: a Plan and a Scorer) and ``predict`` maps a DataFrame of documents (``pmid``, ``title``,
``abstract``, ``entities``; see ``drugprot.records``) to a DataFrame of relations (``pmid``, ``type``,
``arg1``, ``arg2``, ``score``, ``votes``). The ``drugprot`` package travels with the model (``code_paths``), so
``mlflow models predict``/``serve`` and ``mlflow.pyfunc.load_model`` work in an environment made from the model's
``requirements.txt`` alone. This file travels in the artifact store with the weights, so it cannot vouch for them:
``drugprot.registry.load_pyfunc`` checks a registered version (manifest digest, signature) before MLflow runs it.

Params at predict time: ``threshold`` (drop relations scoring below it). ``model_config`` at load time:
``device`` (``auto``/``cpu``/``cuda``) and any field of ``drugprot.inference.options.InferenceOptions`` (``vote``,
``execution``, ``precision`` …).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class DrugprotEnsembleModel(PythonModel):
    def load_context(self, context):
        from drugprot.inference.loading import Predictor
        from drugprot.inference.options import InferenceOptions

        config = dict(getattr(context, "model_config", None) or {})
        options = InferenceOptions(**{k: v for k, v in config.items() if k in InferenceOptions.model_fields})
        self.predictor = Predictor.from_ensemble(context.artifacts["ensemble"], device=config.get("device", "auto"),
                                                 options=options)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from drugprot.records import frame_to_documents, relations_to_frame

        documents = frame_to_documents(model_input)
        threshold = float((params or {}).get("threshold", 0.0))
        plan, scorer = self.predictor.plan, self.predictor.scorer
        job = plan.prepare(documents)
        relations = plan.decode(job, scorer.probabilities(job, skip_settled=True), threshold)
        return relations_to_frame(documents, plan.by_document(documents, relations))


mlflow.models.set_model(DrugprotEnsembleModel())
