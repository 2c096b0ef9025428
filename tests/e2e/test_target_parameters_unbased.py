"""target_parameters read WITHOUT a base: which factors belong to which parameter, rank, scale.

PEFT nests one ParamWrapper per targeted parameter of a module in the module's parameter order
(the first innermost, saved under the most ``.base_layer`` infixes), not in the config's order.
The oracle is PEFT's loaded model: each wrapper's ``parameter_name``, r and scaling, and the
factors saved under that wrapper's own key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from loracc.cli import main
from loracc.io.peft import read_peft_adapter
from tests.support import peft_oracle as po

pytest.importorskip("transformers")
pytest.importorskip("peft")

REVERSED = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]  # not the module's order


def _spec(case: str, order: list[str] | None) -> po.CaseSpec:
    spec = po.CASE_SPECS[case]
    if order is None:
        return spec
    return po.spec_replace(spec, lora={**spec.lora, "target_parameters": order})


@pytest.fixture(
    scope="module",
    params=[
        ("qwen3moe_target_param_3d", None),
        ("qwen3moe_target_param_3d", REVERSED),
        ("gpt_oss_target_param_3d", REVERSED),
        ("mixtral_target_param_3d", REVERSED),
        ("qwen3moe_target_param_3d_single", None),
    ],
    ids=["qwen3moe", "qwen3moe-reversed", "gpt_oss-reversed", "mixtral-reversed", "single"],
)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> po.Case:
    name, order = request.param
    return po.build_case(name, tmp_path_factory.mktemp(name), _spec(name, order))


def _cli(*argv: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in argv], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"loracc raised {result.exception!r}") from result.exception
    return result.exit_code, result.stdout + result.stderr


def _wrappers(case: po.Case) -> dict[str, tuple[str, dict[str, Any]]]:
    """``<module>.<param>`` -> (PEFT's wrapper module path, its r / scale) for every wrapper."""
    out = {}
    for path, site in case.sites.items():
        if site["parameter_name"]:
            owner = path.replace(".base_layer", "")
            out[f"{owner}.{site['parameter_name']}"] = (path, site)
    return out


def _experts(case: po.Case) -> int:
    cfg = po.config_json(case.base_dir)
    return int(cfg.get("num_experts") or cfg["num_local_experts"])


def test_inspect_without_base_matches_peft(case: po.Case) -> None:
    code, out = _cli("inspect", case.adapter_dir, "--json")
    assert code == 0, out
    got = {s["module"]: s for s in json.loads(out)["sites"] if s["kind"] == "parameter"}
    wrappers = _wrappers(case)
    assert sorted(got) == sorted(wrappers)
    for name, (path, peft_site) in wrappers.items():
        A = po.adapter_factor(case, path, "lora_A")
        B = po.adapter_factor(case, path, "lora_B")
        site = got[name]
        assert (site["rank"], site["scale"]) == (peft_site["r"], peft_site["scale"]), name
        experts = _experts(case) if ".experts." in name else 0  # Mixtral's router: 2-D
        assert site["experts"] == experts, name
        assert site["shape"] == [experts, B.shape[0], A.shape[1]][not experts :], name


def test_reader_without_base_takes_each_wrappers_own_factors(case: po.Case) -> None:
    sites = {s.module: s for s in read_peft_adapter(case.adapter_dir, None).sites}
    for name, (path, _) in _wrappers(case).items():
        assert sites[name].lora_A.equal(po.adapter_factor(case, path, "lora_A")), name
        assert sites[name].lora_B.equal(po.adapter_factor(case, path, "lora_B")), name


@pytest.mark.parametrize(
    "case",
    [("qwen3moe_target_param_3d_single", None), ("qwen3moe_target_param_3d", None)],
    indirect=True,
    ids=["single", "nested"],
)
def test_convert_without_base_refuses_instead_of_writing(case: po.Case, tmp_path: Path) -> None:
    """The writer has no 3-D expert sites (nor nested wrappers): exit 2 and no output, where
    the old reader, with E unknown, wrote r·E as the rank (an adapter peft cannot load)."""
    code, out = _cli("convert", "--adapter", case.adapter_dir, "-o", tmp_path / "out")
    assert code == 2, out
    assert len(out.strip().splitlines()) == 1 and "experts" in out, out
    assert not (tmp_path / "out").exists()


def _edited(case: po.Case, tmp_path: Path, **config: Any) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.mark.parametrize("case", [("qwen3moe_target_param_3d", None)], indirect=True, ids=[""])
def test_unknown_parameter_order_refuses_naming_the_module_and_base(
    case: po.Case, tmp_path: Path
) -> None:
    """Two parameters whose registration order loracc does not know: the file cannot decide."""
    folder = _edited(case, tmp_path, target_parameters=["experts.w_in", "experts.w_out"])
    code, out = _cli("inspect", folder)
    assert code == 2, out
    line = out.strip()
    assert "\n" not in line and "model.layers.0.mlp.experts" in line and "--base" in line


@pytest.mark.parametrize("case", [("qwen3moe_target_param_3d", None)], indirect=True, ids=[""])
def test_rank_that_does_not_split_the_factors_refuses(case: po.Case, tmp_path: Path) -> None:
    """r=3 cannot produce lora_A with 2·4 rows: the expert count is unknown without a base."""
    folder = _edited(case, tmp_path, r=3)
    code, out = _cli("inspect", folder)
    assert code == 2, out
    assert "\n" not in out.strip() and "r=3" in out and "--base" in out
