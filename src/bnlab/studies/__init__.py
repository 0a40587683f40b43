"""Named studies: the Santurkar et al. (2018) reproduction and its parts, declared as data.

``santurkar_study(data, quick=..., seeds=...)`` declares the reproduction; ``measure_study``
the same probes on a user's model; ``run_study(study, out, jobs=...)`` runs either into a
study folder that :func:`bnlab.report.build_report` turns into the report.
"""

from bnlab.studies.run import run_study
from bnlab.studies.santurkar import Study, StudySettings, santurkar_study
from bnlab.studies.user_model import measure_study

__all__ = ["Study", "StudySettings", "measure_study", "run_study", "santurkar_study"]
