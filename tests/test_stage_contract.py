"""The stage table is the one place stage facts are declared: everything else reads them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sadtalker_rt import stages
from sadtalker_rt.stages import STAGES, upstream

PACKAGE = Path(stages.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != Path(stages.__file__))

# Names under which these facts were once declared again outside the stage table.
FACT_NAMES = {"FPS", "VIDEO_FPS", "SAMPLE_RATE", "AUDIO_RATE", "SAMPLES_PER_FRAME", "POSE_CHUNK", "POSE_SEQ_LEN",
              "SEQ_LEN", "SEMANTIC_RADIUS", "OPSET", "EXPORT_ORDER", "ORDER", "RENDER_SIZES", "PREPROCESS_MODES",
              "CROP_MODES", "COEFFS", "FULL_COEFFS", "COEFF_DIMS", "FULL_COEFF_DIMS", "IMAGE_OUTPUTS", "NUM_CLASSES"}


def _trees():
    for path in SOURCES:
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text())


def test_no_module_declares_a_stage_fact_again():
    found = []
    for path, tree in _trees():
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            found += [f"{path}:{node.lineno} {t.id}" for t in targets if isinstance(t, ast.Name) and t.id in FACT_NAMES]
    assert not found, "declared outside sadtalker_rt/stages.py: " + ", ".join(found)


def test_no_literal_sample_rate_or_full_mode_test():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == stages.SAMPLE_RATE and type(node.value) is int:
                found.append(f"{path}:{node.lineno} literal {node.value}")
            if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value == "full"
                    and isinstance(node.ops[0], (ast.In, ast.NotIn))):
                found.append(f"{path}:{node.lineno} '\"full\" in ...' (use stages.is_full)")
    assert not found, ", ".join(found)


def test_no_module_lists_the_stages_again():
    names = set(STAGES)
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List)):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(listed & names) >= 3:
                    found.append(f"{path}:{node.lineno}")
    assert not found, "stage lists outside the table (use stages.ORDER): " + ", ".join(found)


@pytest.mark.parametrize("name", list(STAGES))
def test_wiring_names_real_outputs_of_earlier_stages(name):
    order = list(STAGES)
    for tensor in STAGES[name].inputs:
        source = upstream(tensor)
        if source is None:
            continue
        stage, output = source
        assert order.index(stage) < order.index(name), f"{name}.{tensor.name} fed by a later stage {stage}"
        produced = STAGES[stage].output(output)
        assert produced.shape[1:] == tensor.shape[1:] and produced.dtype == tensor.dtype, (tensor, produced)


def test_stage_table_layout_facts_agree():
    assert stages.SAMPLES_PER_FRAME * stages.FPS == stages.SAMPLE_RATE
    assert STAGES["mapping"].input("semantics").shape[1:] == (stages.COEFFS, stages.SEMANTIC_WINDOW)
    assert STAGES["mapping_full"].input("semantics").shape[1:] == (stages.FULL_COEFFS, stages.SEMANTIC_WINDOW)
    assert STAGES["audio2pose"].output("motion").shape == (stages.POSE_CHUNK, stages.POSE.stop - stages.POSE.start)
    assert all(stages.is_full(m) == (stages.mapping_stage(m) == "mapping_full") for m in stages.PREPROCESS_MODES)
