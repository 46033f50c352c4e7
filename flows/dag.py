"""The order in which a DVC repository's stages run, read with DVC's own API.

No copy of the DAG lives here: adding a stage to dvc.yaml is all it takes for the flow to run it.
"""

from pathlib import Path

import networkx as nx
from dvc.dvcfile import PROJECT_FILE
from dvc.repo import Repo
from dvc.stage import PipelineStage, Stage


def stage_order(repo: str | Path) -> list[str]:
    """Every stage of the DVC repository rooted at `repo`, each after the stages it depends on.

    Names are DVC's stage addresses, the ones `dvc repro` takes: `name` for a stage of the root
    dvc.yaml, `sub/dvc.yaml:name` for a nested one, `path.dvc` for a `dvc add`-ed data source.
    Stages that do not depend on each other keep the order in which DVC lists them (file order),
    so the same dvc.yaml always gives the same order.
    """
    with Repo(str(repo)) as dvc_repo:
        position = {stage: i for i, stage in enumerate(dvc_repo.index.stages)}
        # DVC's edges point from a stage to the stages it depends on; reversed, a topological
        # order puts every dependency first.
        upstream_first = dvc_repo.index.graph.reverse(copy=False)
        ordered = nx.lexicographical_topological_sort(upstream_first, key=position.__getitem__)
        return [_address(stage) for stage in ordered]


def _address(stage: Stage) -> str:
    # Not Stage.addressing: that is relative to this process's working directory, while
    # `dvc repro` runs in the repository root and names stages relative to it.
    if not isinstance(stage, PipelineStage):
        return stage.path_in_repo
    if stage.path_in_repo == PROJECT_FILE:
        return stage.name
    return f"{stage.path_in_repo}:{stage.name}"
