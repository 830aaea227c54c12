"""What a third-party plugin author builds against: capabilities and needs checked at compose time,
callbacks with validated options, the public per-step token count, the base config classes, and
the plugin guide's example plugin (docs/plugins.md), installed and run as written."""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap

import pytest
import torch

from lmkit.errors import ConfigError
from lmkit.registry import Component
from lmkit_test_utils import REPO, TINY

CONTRACT_PLUGIN = '''
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn

import lmkit
from lmkit.models.base import ArchitectureConfig

RECORDS = []  # (callback name, cfg, last_step_tokens) per training step


@dataclass
class NoMaskConfig(ArchitectureConfig):
    name: str = "nomask"
    d_model: int = 16
    max_seq_len: int = 64


class NoMask(nn.Module):
    """A decoder whose forward takes no attention mask (nor document ids): running means of embeddings."""

    kind = "decoder"
    logits_are_linear = True

    def __init__(self, cfg):
        super().__init__()
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, input_ids, *, padding_mask=None):
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        x = x.cumsum(1) / torch.arange(1, T + 1, device=x.device)[None, :, None]
        return self.proj(x)

    def output_embedding(self):
        return self.wte.weight

    def logits(self, hidden):
        return hidden @ self.wte.weight.t()

    def transformer_blocks(self):
        return []

    def embedding_modules(self):
        return [self.wte, self.wpe]


@dataclass
class RecorderConfig:
    tag: str = "default"
    every: int = 1


class Recorder(L.Callback):
    def __init__(self, name, cfg):
        self.name, self.cfg = name, cfg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RECORDS.append((self.name, self.cfg, pl_module.last_step_tokens))


@lmkit.hookimpl
def lmkit_register_architectures():
    return [
        lmkit.Component("nomask", NoMask, NoMaskConfig, "decoder without attention masks", meta={"kind": "decoder"}),
        lmkit.Component("nomask_fn", lambda cfg: NoMask(cfg), NoMaskConfig, "the same, built by a function",
                        meta={"kind": "decoder"}),
    ]


@lmkit.hookimpl
def lmkit_register_callbacks():
    return [
        lmkit.Component("recorder", lambda cfg: Recorder("recorder", cfg), RecorderConfig, "records its options"),
        lmkit.Component("plain", lambda cfg: Recorder("plain", cfg), description="no options"),
    ]


@lmkit.hookimpl
def lmkit_config_dirs():
    return [str(Path(__file__).parent / "lmkit_test_contract_conf")]
'''

PRESETS = {"nomask_tiny": "name: nomask\nd_model: 16\n", "nomask_fn_tiny": "name: nomask_fn\nd_model: 16\n"}
RUN = [o for o in TINY if not o.startswith(("model.", "trainer.max_steps", "trainer.val_check_interval"))] + [
    "trainer.max_steps=2", "trainer.val_check_interval=2"]


@pytest.fixture
def fresh_plugins():
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()
    yield
    get_plugin_manager.cache_clear()


@pytest.fixture
def contract(fake_plugin, fresh_plugins):
    """The plugin above, installed as distribution ``lmkit-contract`` with its ``model=`` presets."""
    root = fake_plugin("lmkit-contract", "lmkit_test_contract", CONTRACT_PLUGIN, version="1.2")
    for name, text in PRESETS.items():
        path = root / "lmkit_test_contract_conf" / "model" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager()  # loads the entry point
    import lmkit_test_contract

    lmkit_test_contract.RECORDS.clear()
    return lmkit_test_contract


def cli(args, capsys) -> tuple[int, str]:
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lmkit: error:")]


# -- capabilities and needs ----------------------------------------------------------------------
def test_decoder_without_attention_mask_is_refused_for_prefix_lm(contract, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(RUN + ["+objective=prefix_lm", "model=nomask_tiny"], capsys)
    assert rc == 2, err[-3000:]
    (line,) = error_lines(err)
    assert "objective 'prefix_lm' needs an architecture that accepts attn_mask" in line
    assert "architecture 'nomask' (model=nomask_tiny, from lmkit-contract)" in line
    assert "it accepts: no optional inputs" in line
    # the architectures that have it and fit, and the model= presets that name them
    assert "Drop model= to get its default (model=gpt_tiny)" in line
    assert "choose a model= preset that fits: bart_base" in line and "gpt_tiny" in line and "t5_tiny" in line
    assert "(architectures: bart, gpt, llama, t5)" in line
    assert "nomask" not in line.split("fits:")[1]  # neither the refused one nor the unchecked nomask_fn
    assert not (tmp_path / "outputs").exists()


def test_the_same_decoder_trains_causal_lm_and_its_config_gets_the_tokenizer_vocabulary(contract, tmp_path,
                                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(RUN + ["model=nomask_tiny"], capsys)
    assert rc == 0, err[-3000:]


def test_needs_follow_the_objective_options(contract):
    from lmkit.api import load_run_config

    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=causal_lm", "objective.document_mask=true", "model=nomask_tiny"])
    msg = str(e.value)
    assert "objective 'causal_lm' needs an architecture that accepts document_ids" in msg
    assert ("Set objective.document_mask=false, drop model= to get its default (model=gpt_tiny), or choose a "
            "model= preset that fits: gpt2_124m") in msg
    assert load_run_config(["+objective=causal_lm", "model=nomask_tiny", "data.seq_len=32"]).model_component.name == "nomask"


def test_function_factory_without_declaration_is_not_checked(contract):
    from lmkit.api import load_run_config

    run = load_run_config(["+objective=prefix_lm", "model=nomask_fn_tiny", "data.seq_len=32"])
    assert run.model_component.name == "nomask_fn"


def test_incompatible_kind_lists_plugin_presets_too(contract):
    from lmkit.api import load_run_config

    with pytest.raises(ConfigError) as e:
        load_run_config(["model=bert_tiny"])
    msg = str(e.value)
    assert ("choose a model= preset that fits: gpt2_124m, gpt2_350m, gpt_small, gpt_tiny, llama_1b, llama_small, "
            "llama_tiny, nomask_fn_tiny, nomask_tiny, retro_small, retro_tiny, transformer_xl_base") in msg
    assert "(architectures: gpt, llama, nomask, nomask_fn, retro, transformer_xl)" in msg


def test_architecture_accepts_resolution():
    from lmkit.models.base import architecture_accepts
    from lmkit.models.gpt import GPT

    class Plain(torch.nn.Module):
        def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None):
            return input_ids

        def pooled(self, hidden):
            return hidden[:, 0]

    class Anything(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert architecture_accepts(Component("gpt", GPT)) == GPT.accepts  # the class attribute
    assert architecture_accepts(Component("p", Plain)) == {"attn_mask", "token_type_ids", "pooled"}
    assert architecture_accepts(Component("a", Anything)) == {"attn_mask", "token_type_ids", "document_ids",
                                                             "decoder_input_ids"}
    assert architecture_accepts(Component("f", lambda cfg: Plain())) is None  # unknown: not checked
    declared = Component("d", Anything, meta={"accepts": ["attn_mask"]})
    assert architecture_accepts(declared) == {"attn_mask"}  # meta wins


def test_objective_needs_resolution():
    from lmkit.objectives.base import objective_needs
    from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig

    assert objective_needs(Component("c", CausalLM), CausalLMConfig(), "decoder") == set()
    assert objective_needs(Component("c", CausalLM), CausalLMConfig(document_mask=True), "decoder") == {"document_ids"}
    assert objective_needs(Component("p", PrefixLM), PrefixLMConfig(), "decoder") == {"attn_mask"}
    assert objective_needs(Component("p", PrefixLM), PrefixLMConfig(), "encoder_decoder") == {"decoder_input_ids"}
    assert objective_needs(Component("x", lambda cfg, tok: None), None, "decoder") == set()  # undeclared: nothing
    assert objective_needs(Component("x", CausalLM, meta={"needs": ["pooled"]}), None, "decoder") == {"pooled"}
    dynamic = Component("x", CausalLM, meta={"needs": lambda cfg, kind: {"attn_mask"} if kind == "decoder" else ()})
    assert objective_needs(dynamic, None, "decoder") == {"attn_mask"} and objective_needs(dynamic, None, "encoder") == set()


KWARG_CAPABILITIES = {"attn_mask", "token_type_ids", "document_ids", "decoder_input_ids"}


@pytest.mark.parametrize("name", ["gpt", "bert", "albert", "t5", "bart", "llama"])
def test_builtin_architectures_declare_what_they_honour(name):
    """``accepts`` is the class attribute, copied into meta; every declared input changes the output
    (and, but for token_type_ids, which an architecture without segment embeddings takes and
    ignores, every input the forward takes without declaring it leaves the output alone)."""
    from lmkit.plugins import PluginManager

    component = PluginManager().get("architecture", name)
    cls = component.factory
    assert component.meta["accepts"] == cls.accepts and component.meta["kind"] == cls.kind
    taken = set(inspect.signature(cls.forward).parameters) & KWARG_CAPABILITIES
    assert set(cls.accepts) - {"pooled"} <= taken
    assert ("pooled" in cls.accepts) == callable(getattr(cls, "pooled", None))
    assert ("token_type_ids" in cls.accepts) == ("token_type_ids" in taken)

    torch.manual_seed(0)
    cfg = dataclasses.replace(component.config_cls(), n_layer=1, n_head=2, d_model=16, d_ff=32, vocab_size=50)
    model = cls(cfg).eval()
    B, T = 2, 8
    ids = torch.randint(5, 50, (B, T))
    base = {"decoder_input_ids": ids[:, :5]} if cls.kind == "encoder_decoder" else {}
    variants = {
        "attn_mask": {"attn_mask": torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
                      if cls.kind != "decoder" else torch.ones(B, T, T, dtype=torch.bool)},
        "token_type_ids": {"token_type_ids": torch.ones(B, T, dtype=torch.long)},
        "document_ids": {"document_ids": (torch.arange(T) >= T // 2).long().expand(B, T)},
        "decoder_input_ids": {"decoder_input_ids": ids[:, 1:6]},
    }
    with torch.no_grad():
        reference = model(ids, **base)
        for cap in sorted(taken - {"token_type_ids"}):
            changed = not torch.allclose(model(ids, **{**base, **variants[cap]}), reference)
            assert changed == (cap in cls.accepts), f"{name}: {cap} {'changes' if changed else 'does not change'} the output"


OBJECTIVE_RUNS = {  # objective -> (default model's architecture kind, what its loss passes the model)
    "causal_lm": ("decoder", set()), "mlm": ("encoder", {"token_type_ids"}),
    "nsp": ("encoder", {"token_type_ids", "pooled"}), "sop": ("encoder", {"token_type_ids", "pooled"}),
    "span_bert": ("encoder", {"token_type_ids"}), "span_corruption": ("encoder_decoder", {"decoder_input_ids"}),
    "electra": ("encoder", {"token_type_ids"}),
    "bart_denoising": ("encoder_decoder", {"decoder_input_ids"}), "ul2": ("encoder_decoder", {"decoder_input_ids"}),
    "prefix_lm": ("decoder", {"attn_mask"}), "prefix_lm_seq2seq": ("encoder_decoder", {"decoder_input_ids"}),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVE_RUNS))
def test_builtin_objectives_need_what_their_loss_passes(name):
    """One loss of each built-in objective on its default model (1 tiny layer), recording the inputs it uses."""
    import numpy as np

    from lmkit.api import load_run_config
    from lmkit.data.sources import BUILTIN_CORPORA
    from lmkit.objectives.base import objective_needs
    from lmkit.tokenizers.byte import ByteTokenizer

    run = load_run_config([f"+objective={name}", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
                           "data.seq_len=64"])
    kind, expected = OBJECTIVE_RUNS[name]
    assert run.model_component.meta["kind"] == kind
    needs = objective_needs(run.objective_component, run.objective, kind)
    assert needs == expected
    tokenizer = ByteTokenizer(num_sentinels=64)
    objective = run.objective_component.factory(run.objective, tokenizer)
    model = run.model_component.factory(dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size))
    objective.attach(model)
    length, _ = objective.block_layout(64)
    data = np.frombuffer(BUILTIN_CORPORA["tinyshakespeare"].read_text()[:4000].encode(), dtype=np.uint8)
    blocks = torch.from_numpy(np.stack([data[i * 300:i * 300 + length] for i in range(4)]).astype(np.int64))
    batch = objective.make_collator()(blocks, torch.Generator().manual_seed(0))

    used: set[str] = set()
    forward, pooled = model.forward, getattr(model, "pooled", None)

    def recording_forward(*args, **kwargs):
        used.update(k for k, v in kwargs.items() if v is not None and k in KWARG_CAPABILITIES)
        return forward(*args, **kwargs)

    def recording_pooled(*args, **kwargs):
        used.add("pooled")
        return pooled(*args, **kwargs)

    model.forward = recording_forward
    if pooled is not None:
        model.pooled = recording_pooled
    objective.loss(model, batch)
    assert used == needs, f"{name} passes {sorted(used)} but declares {sorted(needs)}"


# -- callbacks with options ----------------------------------------------------------------------
def test_callback_factory_gets_validated_options_and_the_public_token_count(contract, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(RUN + ["model=nomask_tiny", "callbacks=[recorder,plain,token_throughput]",
                         "+callback_options.recorder.tag=mine", "callback_options.token_throughput.window=2"], capsys)
    assert rc == 2  # callback_options.token_throughput is not a key of the root config: needs the plus
    assert "write '+callback_options.token_throughput.window=...'" in error_lines(err)[0]
    rc, err = cli(RUN + ["model=nomask_tiny", "callbacks=[recorder,plain,token_throughput]",
                         "+callback_options.recorder.tag=mine", "+callback_options.token_throughput.window=2"], capsys)
    assert rc == 0, err[-3000:]
    records = contract.RECORDS
    assert [r[0] for r in records] == ["recorder", "plain"] * 2
    recorder_cfg = records[0][1]
    assert type(recorder_cfg).__name__ == "RecorderConfig" and (recorder_cfg.tag, recorder_cfg.every) == ("mine", 1)
    assert records[1][1] is None  # no config_cls: the factory gets None, not the raw run config
    assert all(r[2] == 4 * 32 for r in records)  # batch 4 x seq_len 32 input tokens, one micro-batch per step


@pytest.mark.parametrize("overrides, expected", [
    (["+callback_options.recorder.tagg=x"],
     "unknown config key 'callback_options.recorder.tagg'. Did you mean 'callback_options.recorder.tag'?"),
    (["+callback_options.recorder.every=often"], "invalid value for 'callback_options.recorder.every'"),
    (["+callback_options.plain.x=1"], "callback 'plain' (lmkit-contract) takes no options"),
    (["+callback_options.lr_monitor.logging_interval=epoch"],
     "callback_options.lr_monitor is set, but callback 'lr_monitor' is not enabled: add it to callbacks "
     "(callbacks=[recorder,plain,lr_monitor])"),
    (["+callback_options.recordr.tag=x"], "callback_options.recordr: unknown callback 'recordr'. Did you mean 'recorder'?"),
    (["callbacks=[recorder,{name:plain}]"], "callbacks lists callback names"),
])
def test_bad_callback_options_are_refused_with_the_key(contract, overrides, expected):
    from lmkit.api import load_run_config

    with pytest.raises(ConfigError) as e:
        load_run_config(["callbacks=[recorder,plain]", *overrides])
    assert expected in str(e.value)


def test_builtin_callback_options():
    from lmkit.api import load_run_config

    run = load_run_config(["callbacks=[token_throughput,lr_monitor]", "+callback_options.lr_monitor.logging_interval=epoch"])
    assert run.callback_configs["lr_monitor"].logging_interval == "epoch"
    assert run.callback_configs["token_throughput"].window == 1  # defaults for keys not given
    lr_monitor = run.callbacks[1].factory(run.callback_configs["lr_monitor"])
    assert lr_monitor.logging_interval == "epoch"
    with pytest.raises(ConfigError, match="callback_options.lr_monitor.logging_interval must be one of step, epoch"):
        load_run_config(["callbacks=[lr_monitor]", "+callback_options.lr_monitor.logging_interval=batch"])
    defaults = load_run_config([]).callback_configs  # the default callbacks, each with its default options
    assert set(defaults) == {"token_throughput", "compute_accounting"}
    assert defaults["token_throughput"] == run.callback_configs["token_throughput"]


def test_moe_balance_takes_its_window_from_callback_options():
    pytest.importorskip("lmkit_moe")
    from lmkit.api import load_run_config

    run = load_run_config(["callbacks=[moe_balance]", "+callback_options.moe_balance.window=5",
                           "+callback_options.moe_balance.verbose=false"])
    callback = run.callbacks[0].factory(run.callback_configs["moe_balance"])
    assert (callback.window, callback.verbose) == (5, False)
    with pytest.raises(ConfigError, match="callback_options.moe_balance.window must be >= 1"):
        load_run_config(["callbacks=[moe_balance]", "+callback_options.moe_balance.window=0"])


# -- base config classes -------------------------------------------------------------------------
def test_builtin_configs_subclass_the_base_classes_with_their_defaults():
    from lmkit.models.albert import ALBERTConfig
    from lmkit.models.bart import BARTConfig
    from lmkit.models.base import ArchitectureConfig
    from lmkit.models.bert import BERTConfig
    from lmkit.models.gpt import GPTConfig
    from lmkit.models.t5 import T5Config
    from lmkit.optim import OptimizerConfigBase
    from lmkit.optim.optimizers import OptimizerConfig

    defaults = {GPTConfig: ("gpt", 256), BERTConfig: ("bert", 512), ALBERTConfig: ("albert", 512),
                T5Config: ("t5", 512), BARTConfig: ("bart", 1024)}
    for cls, (name, max_len) in defaults.items():
        cfg = cls()
        assert isinstance(cfg, ArchitectureConfig)
        assert (cfg.name, cfg.max_seq_len, cfg.vocab_size, cfg.compile) == (name, max_len, None, False)
        assert dataclasses.replace(cfg, vocab_size=7).vocab_size == 7
    opt = OptimizerConfig()
    assert isinstance(opt, OptimizerConfigBase) and (opt.name, opt.lr, opt.weight_decay) == ("adamw", 1e-3, 0.0)
    with pytest.raises(ConfigError, match="optimizer.weight_decay must be >= 0"):
        OptimizerConfigBase(weight_decay=-1)


# -- the plugin guide's example, installed and run as written ------------------------------------
def guide_files() -> dict[str, str]:
    """Code blocks of docs/plugins.md whose first line is ``# FILE: path``."""
    text = (REPO / "docs" / "plugins.md").read_text()
    files = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        m = re.match(r"#\s*FILE:\s*(\S+)", first)
        if m:
            files[m.group(1)] = rest
    return files


def test_plugin_guide_example_installs_and_trains(fake_plugin, fresh_plugins, tmp_path, monkeypatch, capsys):
    files = guide_files()
    assert {"pyproject.toml", "lmkit_tinymix/plugin.py", "lmkit_tinymix/conf/model/tinymix_tiny.yaml"} <= set(files)
    entry = re.search(r'\[project\.entry-points\.lmkit\]\s*\n(\w+)\s*=\s*"([\w.]+)"', files["pyproject.toml"])
    assert entry and entry.group(2) == "lmkit_tinymix.plugin"
    root = fake_plugin("lmkit-test-guide-site", "lmkit_test_guide_site", "", version="0.1.0")  # a site dir on sys.path
    for path, text in files.items():
        if path != "pyproject.toml":
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(textwrap.dedent(text))
    (root / "lmkit_tinymix" / "__init__.py").touch()
    info = root / "lmkit_tinymix-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmkit-tinymix\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[lmkit]\n{entry.group(1)} = {entry.group(2)}\n")
    monkeypatch.chdir(tmp_path)
    try:
        rc, err = cli(RUN + ["model=tinymix_tiny", "optimizer=plain_sgd", "callbacks=[token_throughput,loss_spike]",
                             "+callback_options.loss_spike.factor=3.0"], capsys)
        assert rc == 0, err[-3000:]
        rc, err = cli(RUN + ["model=tinymix_tiny", "callbacks=[loss_spike]", "+callback_options.loss_spike.factor=1"],
                      capsys)
        assert rc == 2 and "callback_options.loss_spike.factor must be > 1, got 1" in error_lines(err)[0]
        rc, err = cli(RUN + ["+objective=prefix_lm", "model=tinymix_tiny"], capsys)
        assert rc == 2 and "needs an architecture that accepts attn_mask" in error_lines(err)[0]
    finally:
        import sys

        for name in [m for m in sys.modules if m.startswith("lmkit_tinymix")]:
            del sys.modules[name]
