"""Official checkpoint files as users have them load through one path; damaged or foreign files are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sadtalker_rt.models.checkpoints import (CHECKPOINT_SUBNETWORKS, SUBNETWORKS, WeightSource, official_template,
                                             safetensors_name)
from sadtalker_rt.cli import main
from sadtalker_rt.errors import WeightsError
from sadtalker_rt.models.synthetic import synthetic_state_dict

SAFETENSORS_SUBNETWORKS = [n for n, s in SUBNETWORKS.items() if s.prefix]


def official_keys(conformance_dir) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = (conformance_dir / "manifest" / "official_safetensors_keys.tsv").read_text().splitlines()
    keys = {}
    for row in rows:
        key, shape, dtype = row.split("\t")
        keys[key] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype.replace("torch.", ""))
    return keys


def write_mapping(path, coeff_nc: int, seed: int = 0) -> dict:
    state = {k: torch.from_numpy(v) for k, v in synthetic_state_dict(official_template(
        "mapping" if coeff_nc == 70 else "mapping_full"), seed).items()}
    torch.save({"mapping": state, "epoch": 229}, path)
    return state


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, conformance_dir):
    """A checkpoint directory laid out like the official release, every key of the 1305 present."""
    from safetensors.numpy import save_file

    keys = official_keys(conformance_dir)
    assert len(keys) == 1305
    arrays = {}
    for name in SAFETENSORS_SUBNETWORKS:
        prefix = SUBNETWORKS[name].prefix
        template = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
        arrays.update({prefix + k: v for k, v in synthetic_state_dict(template, 7).items()})
    directory = tmp_path_factory.mktemp("checkpoints")
    save_file(arrays, str(directory / safetensors_name(256)))
    write_mapping(directory / SUBNETWORKS["mapping"].legacy_file, 70)
    write_mapping(directory / SUBNETWORKS["mapping_full"].legacy_file, 73)
    return directory


def test_official_key_set_loads_into_every_module(official_dir):
    source = WeightSource(official_dir, size=256)
    for name in CHECKPOINT_SUBNETWORKS:
        module = source.build(name)
        assert not module.training


def test_official_file_and_synthetic_weights_take_the_same_path(official_dir):
    """Loading the file gives the same parameters as handing the same arrays to the loader directly."""
    from_file = WeightSource(official_dir, size=256).build("generator").state_dict()
    template = official_template("generator")
    direct = WeightSource(synthetic_seed=7).state_dict("generator")
    assert set(direct) == set(template)
    from sadtalker_rt.models.checkpoints import build_subnetwork

    rebuilt = build_subnetwork("generator", direct, "direct").state_dict()
    assert all(torch.equal(from_file[k], rebuilt[k]) for k in from_file)


def test_legacy_files(official_dir, tmp_path):
    from safetensors.numpy import load_file

    arrays = load_file(str(official_dir / safetensors_name(256)))
    legacy = {"epoch_20.pth": ("net_recon", "face_3drecon."), "auido2exp_00300-model.pth": ("model", "audio2exp."),
              "auido2pose_00140-model.pth": ("model", "audio2pose.")}
    for file, (key, prefix) in legacy.items():
        torch.save({key: {k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)},
                    "epoch": 1}, tmp_path / file)
    torch.save({"generator": {k[10:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("generator.")},
                "kp_detector": {k[13:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("kp_extractor.")},
                "epoch": 189}, tmp_path / "facevid2vid_00189-model.pth.tar")
    for mapping in ("mapping", "mapping_full"):
        (tmp_path / SUBNETWORKS[mapping].legacy_file).write_bytes((official_dir / SUBNETWORKS[mapping].legacy_file)
                                                                  .read_bytes())
    source = WeightSource(tmp_path, size=256, old_version=True)
    for name in CHECKPOINT_SUBNETWORKS:
        source.build(name)


def test_truncated_safetensors_is_refused(official_dir, tmp_path):
    data = (official_dir / safetensors_name(256)).read_bytes()
    (tmp_path / safetensors_name(256)).write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="safetensors"):
        WeightSource(tmp_path, size=256).build("kp_extractor")


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.layer.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / safetensors_name(256)))
    with pytest.raises(WeightsError, match="not a SadTalker checkpoint"):
        WeightSource(tmp_path, size=256).build("generator")


def test_missing_and_unexpected_keys_are_named(official_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(official_dir / safetensors_name(256)))
    del arrays["generator.decoder.conv_img.weight"]
    arrays["generator.decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(arrays, str(tmp_path / safetensors_name(256)))
    with pytest.raises(WeightsError) as err:
        WeightSource(tmp_path, size=256).build("generator")
    message = str(err.value)
    assert "decoder.conv_img.weight" in message and "decoder.extra.weight" in message
    assert safetensors_name(256) in message and "\n" not in message


def test_mapping_file_for_the_wrong_mode_is_refused(tmp_path):
    write_mapping(tmp_path / SUBNETWORKS["mapping"].legacy_file, 73)      # a full-mode file under the crop name
    with pytest.raises(WeightsError, match="73 coefficients"):
        WeightSource(tmp_path, size=256).build("mapping")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=safetensors_name(512)):
        WeightSource(tmp_path, size=512).build("generator")


def test_pickles_are_read_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"mapping": Payload()}, tmp_path / SUBNETWORKS["mapping"].legacy_file)
    with pytest.raises(WeightsError, match="weights-only"):
        WeightSource(tmp_path, size=256).build("mapping")


def test_conformance_command_passes_on_shared_cases(conformance_dir, tmp_path, capsys):
    """The command end to end on a cheap subset; every stage's cases run in the module tests of their group."""
    out = tmp_path / "conformance.json"
    stages = ("audio2pose", "first_frame_coeffs", "keypoint_transformation", "mapping")
    try:
        main(["conformance", str(conformance_dir), "--json", str(out), *(a for s in stages for a in ("--stage", s))])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert code == 0 and results and all(r["passed"] for r in results), printed
    assert {r["stage"] for r in results} == set(stages)
    assert "0 failed" in printed
