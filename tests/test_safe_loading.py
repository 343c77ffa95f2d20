"""Loading a model, a reward or a config must not run code it brings along: safetensors only
by default, no trust_remote_code unless asked, torch.load only with weights_only=True, YAML
through safe_load."""

import json
import re
from pathlib import Path

import pytest

import tether
from tether.cli import main
from tether.models import load_model

SRC = Path(tether.__file__).resolve().parent


def _record(monkeypatch, module, cls_name):
    """Wrap `module.cls_name.from_pretrained` to record its keyword arguments."""
    cls = getattr(module, cls_name)
    real = cls.from_pretrained.__func__
    calls = []

    def spy(klass, *a, **kw):
        calls.append(kw)
        return real(klass, *a, **kw)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_policy_loads_safetensors_only_and_no_remote_code_by_default(tiny_llama, monkeypatch):
    import tether.models

    model_calls = _record(monkeypatch, tether.models, "AutoModelForCausalLM")
    tok_calls = _record(monkeypatch, tether.models, "AutoTokenizer")
    load_model(str(tiny_llama))
    assert model_calls[-1]["trust_remote_code"] is False
    assert model_calls[-1]["use_safetensors"] is True
    assert tok_calls[-1]["trust_remote_code"] is False
    load_model(str(tiny_llama), trust_remote_code=True, allow_bin_weights=True)
    assert model_calls[-1]["trust_remote_code"] is True
    assert model_calls[-1]["use_safetensors"] is None  # transformers' choice: .bin allowed


def test_hf_reward_loads_safetensors_only_and_no_remote_code_by_default(
    tiny_classifier, monkeypatch
):
    import tether.rewards.hf
    from tether.rewards import load_reward

    calls = _record(monkeypatch, tether.rewards.hf, "AutoModelForSequenceClassification")
    load_reward(f"hf:{tiny_classifier}:nothate")
    assert calls[-1]["trust_remote_code"] is False and calls[-1]["use_safetensors"] is True


def test_model_with_its_own_code_is_refused_and_its_code_never_runs(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys
):
    """A model dir whose config.json points at Python shipped beside it (auto_map)."""
    model = tmp_path / "custom"
    model.mkdir()
    ran = tmp_path / "code-ran"
    (model / "configuration_evil.py").write_text(
        f"open({str(ran)!r}, 'w').write('pwned')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil'\n"
    )
    (model / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
        )
    )
    argv = ["train", "--policy", str(model), "--reward", f"python:{reward_file}:frac_a"]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ships its own Python code" in err[0], err
    assert "--trust-remote-code" in err[0]
    assert not ran.exists()
    assert not (tmp_path / "run").exists()


def test_pickle_weights_are_refused_unless_allowed(tiny_llama, tmp_path):
    """A model saved as pytorch_model.bin (a pickle) only: refused by default, in one line that
    says how; read (through torch.load(weights_only=True)) with --allow-bin-weights."""
    import torch
    from safetensors.torch import load_file

    bin_model = tmp_path / "bin-model"
    bin_model.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "model.safetensors":
            (bin_model / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), bin_model / "pytorch_model.bin")
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="safetensors weights only by default"):
        load_model(str(bin_model))
    loaded = load_model(str(bin_model), allow_bin_weights=True)
    ref = load_model(str(tiny_llama))
    for (name, a), (_, b) in zip(
        loaded.model.state_dict().items(), ref.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_yaml_with_a_python_object_tag_is_refused(tmp_path, capsys):
    ran = tmp_path / "yaml-ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'lr: !!python/object/apply:os.system ["touch {ran}"]\n')
    argv = ["train", "--config", str(cfg), "--policy", "p", "--reward", "python:x.py:f"]
    argv += ["--prompts", "jsonl:p.jsonl", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cfg}: line 1 is not valid YAML" in err[0], err
    assert not ran.exists()


def test_source_has_no_unsafe_loaders():
    """A static check over src/tether: every torch.load passes weights_only=True, YAML is read
    with safe_load only, nothing unpickles, and trust_remote_code is never hard-wired on."""
    problems = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: {m.group(0)}")
        for bad in (
            "yaml.load(",
            "yaml.unsafe_load",
            "yaml.Loader",
            "import pickle",
            "joblib.load",
        ):
            if bad in text:
                problems.append(f"{path.name}: {bad}")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            problems.append(f"{path.name}: trust_remote_code=True")
    assert not problems, problems


def test_pickled_starting_adapter_is_refused_unless_allowed(tiny_llama, tmp_path):
    from tether.config import TrainConfig
    from tether.errors import TetherError
    from tether.trainer import build_policy

    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not even read")
    cfg = TrainConfig.from_flat(
        policy=str(tiny_llama), reward="python:x.py:f", prompts="jsonl:p", out=str(tmp_path / "o")
    )
    with pytest.raises(TetherError, match="holds only adapter_model.bin"):
        build_policy(cfg.replace(adapter=str(adapter)))
    with pytest.raises(TetherError, match="holds no adapter_model.safetensors"):
        build_policy(cfg).load_trainable(adapter)
