"""End to end on the embedded Gemma 3 270M: a small ReSAE stack trained inside the test, served by the real
server on a real port, used through the generated stubs (about a minute on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from core.config import ModelConfig
from tests.service.conftest import ServerLoop, server_config, start_server
from trainer.training.config import config_from_dict
from trainer.training.loop import run_training

HOOKPOINTS = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
PROMPT = "I think that dogs are"


@pytest.fixture(scope="module")
def gemma_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = config_from_dict({
        "model": {"name": "default", "device": "cpu"},
        "activations": {"context_length": 64, "batch_size": 8, "max_tokens": 12288},
        "stack": {"name": "e2e", "hookpoints": HOOKPOINTS, "residualize": True, "calibration_tokens": 4096},
        "sae": {"architecture": "topk", "width": 512, "k": 16},
        "training": {"batch_size": 256, "lr": 2e-3, "warmup_steps": 5, "sparsity_warmup_steps": 0,
                     "buffer_tokens": 8192, "dead_after_tokens": 4096, "checkpoint_every": 1000},
        "eval": {"max_tokens": 1024, "ce_windows": 4},
    })
    return run_training(config, tmp_path_factory.mktemp("gemma-e2e"), progress=False).stack_dir


def _tokens(stub, request: pb.GenerateRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {t.BRANCH_STEERED: [], t.BRANCH_DEFAULT: []}
    for message in stub.Generate(request, timeout=300):
        if message.HasField("token"):
            out[message.token.branch].append(message.token.token_id)
    return out


def test_gemma_with_a_resae_stack_through_the_real_server(server_loop: ServerLoop, gemma_stack: Path, default_host):
    running = start_server(server_loop, server_config(gemma_stack, max_new_tokens=64),
                           model=ModelConfig(name="default", device="cpu"))
    try:
        assert running.health("readiness") == "SERVING"
        info = running.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert info.model.num_layers == 18 and info.model.d_model == 640
        stages = info.stacks[0].stages
        assert [s.hookpoint for s in stages] == HOOKPOINTS
        assert not stages[0].HasField("residual_of") and stages[1].residual_of == 0

        decompose = pb.DecomposeRequest(input=t.Input(text=PROMPT), options=t.DecomposeOptions(top_k=4,
                                                                                                include_error=True))
        messages = list(running.stub.Decompose(decompose, timeout=120))
        tokens = [tok for m in messages if m.HasField("chunk") for tok in m.chunk.tokens]
        assert messages[0].HasField("header") and len(tokens) == messages[0].header.num_tokens
        for token in tokens[1:]:
            for codes in token.features:
                assert codes.l0 == 16 and len(codes.ids) == 4 and codes.error_norm > 0

        # pin the feature that is strongest on the last prompt token at the residual stage
        feature = tokens[-1].features[1].ids[0]
        sampling = pb.SamplingParams(max_new_tokens=12, temperature=0.0)
        steer = t.Intervention(stage=stages[1].name, feature=feature, op=t.INTERVENTION_OP_SET, value=200.0,
                               positions=t.Positions(scope=t.POSITION_SCOPE_ALL))
        request = pb.GenerateRequest(prompt=t.Input(text=PROMPT), sampling=sampling, interventions=[steer],
                                     with_default=True)
        out = _tokens(running.stub, request)
        ids = default_host.encode(PROMPT)
        plain = default_host.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out[t.BRANCH_DEFAULT] == plain[:len(out[t.BRANCH_DEFAULT])]
        assert out[t.BRANCH_STEERED] != out[t.BRANCH_DEFAULT]

        score = running.stub.Score(pb.ScoreRequest(input=t.Input(text=PROMPT + " very loyal animals."),
                                                   splice_stages=[s.name for s in stages]), timeout=120)
        assert score.edited and score.kl > 0 and score.edited_ce >= 0
        assert running.health("readiness") == "SERVING"
    finally:
        running.stop()
