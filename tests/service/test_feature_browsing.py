"""GetFeature's dashboard, SearchFeatures and ListFeatures through a real in-process server on the tiny model,
checked against the stored dashboard tensors and against direct computations through the stack runtime.

Two stacks are served: "tiny" (dashboards, explanations, a meta-SAE on stage 0) and "bare" (none of them), so a
stack without dashboards is shown to load and serve too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from featurewire.v1 import featurewire_pb2 as pb

from core.stack.dashboards import feature_labels, stage_labels
from core.stack.meta_sae import meta_latents
from core.stack.reader import LoadedStack, read_stack
from core.stack.runtime import StackRuntime
from service.engine.operations.decompose import token_texts
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import EXPLANATIONS, one_thread, write_dashboard_stack, write_tiny_stack

TEXT = "The cat sat on the mat"
SIGN_NAMES = {0: pb.SIGN_POSITIVE, 1: pb.SIGN_NEGATIVE}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def dash_stack(tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("browse") / "stack")


@pytest.fixture(scope="module")
def loaded(dash_stack: Path) -> LoadedStack:
    return read_stack(dash_stack)


@pytest.fixture(scope="module")
def browsing(server_loop: ServerLoop, dash_stack: Path, tiny_gemma,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    bare = write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("browse-bare") / "stack", name="bare")
    running = start_server(server_loop, server_config(dash_stack, stacks=(dash_stack, bare), self_check=False))
    yield running
    running.stop()


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def pages(call, request, page_size: int) -> list:
    """Every page of a paged RPC, following next_page_token; returns the concatenated items."""
    items, token, seen = [], "", 0
    while True:
        request.page_size, request.page_token = page_size, token
        response = call(request, timeout=30)
        assert len(response.features) <= page_size
        items += list(response.features)
        seen += 1
        token = response.next_page_token
        if not token:
            assert len(items) == response.total
            return items
        assert seen < 1000


# ------------------------------------------------------------------------------------------ GetFeature


def test_stage_info_limits_and_capabilities(browsing: Running):
    info = browsing.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert {"SearchFeatures", "ListFeatures"} <= set(info.capabilities.rpcs)
    assert (info.limits.max_page_size, info.limits.default_page_size) == (200, 20)
    tiny, bare = info.stacks
    resid1, signed, _, resid3 = tiny.stages
    assert resid1.has_dashboard and resid1.has_density and resid1.has_top_examples and resid1.has_meta_sae
    assert resid1.has_explanations and signed.has_explanations and not resid3.has_explanations
    assert signed.has_dashboard and not signed.has_meta_sae
    assert not any(s.has_dashboard or s.has_density or s.has_explanations or s.has_meta_sae for s in bare.stages)


def _examples(response_examples, d: dict, group: str, at: tuple, sign: float, tokenizer) -> None:
    docs = d[f"{group}_doc"][at]
    stored = [j for j in range(docs.shape[0]) if int(docs[j]) >= 0]
    assert len(response_examples) == len(stored)
    for x, j in zip(response_examples, stored, strict=True):
        ids, acts = d[f"{group}_tokens"][at][j].tolist(), d[f"{group}_acts"][at][j].tolist()
        kept = [n for n, i in enumerate(ids) if i >= 0]
        assert [tok.id for tok in x.tokens] == [ids[n] for n in kept]
        assert [tok.value for tok in x.tokens] == pytest.approx([acts[n] for n in kept])
        assert [tok.text for tok in x.tokens] == token_texts(tokenizer, [ids[n] for n in kept])
        assert x.value == pytest.approx(sign * float(d[f"{group}_value"][at][j]))
        assert x.tokens[x.index].value == pytest.approx(x.value)  # the firing token carries the example's value
        assert (x.document, x.position) == (int(docs[j]), int(d[f"{group}_pos"][at][j]))


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_get_feature_returns_the_stored_dashboard(browsing: Running, loaded: LoadedStack, tiny_gemma, stage: int):
    s = loaded.stages[stage]
    d, names = s.dashboard, [x.name for x in loaded.stages]
    feature = int(d["count"].sum(0).argmax())  # the busiest feature: every part of its dashboard is filled
    response = browsing.stub.GetFeature(pb.GetFeatureRequest(stage=s.name, feature=feature, top_n=3), timeout=30)
    dash, tokens = response.dashboard, s.dashboard_record["tokens"]
    assert response.HasField("dashboard") and len(response.top_tokens) == 3  # the live logit lens stays
    assert (dash.tokens, dash.documents, dash.corpus, dash.context) == (tokens, s.dashboard_record["documents"],
                                                                        "default", 3)
    assert [side.sign for side in dash.sides] == [SIGN_NAMES[n] for n in range(d["count"].shape[0])]
    for n, side in enumerate(dash.sides):
        count = int(d["count"][n, feature])
        assert side.count == count and side.density == pytest.approx(count / tokens)
        assert side.mean == pytest.approx(float(d["sum"][n, feature]) / count if count else 0.0, rel=1e-5)
        assert side.max == pytest.approx(float(d["max"][n, feature]))
        hist = d["hist"][n, feature]
        filled = hist.nonzero().flatten()
        if count:
            lo, hi = int(filled[0]), int(filled[-1])
            assert list(side.histogram.counts) == hist[lo : hi + 1].tolist() and sum(side.histogram.counts) == count
            assert list(side.histogram.edges) == pytest.approx(d["bin_edges"][lo : hi + 2].tolist())
        sign = -1.0 if n else 1.0
        _examples(side.top_examples, d, "top", (n, feature), sign, tiny_gemma.tokenizer)
        shares = d["quantile_share"][n, feature]
        groups = [q for q in range(shares.shape[0]) if float(shares[q]) > 0]
        assert len(side.quantiles) == len(groups)
        for group, q in zip(side.quantiles, groups, strict=True):
            assert (group.low, group.high, group.share) == pytest.approx(
                (float(d["quantile_low"][n, feature, q]), float(d["quantile_high"][n, feature, q]), float(shares[q])))
            _examples(group.examples, d, "quantile", (n, feature, q), sign, tiny_gemma.tokenizer)
    labels = {0 if x.sign > 0 else 1: x for x in feature_labels(d, feature)}
    assert labels, "the busiest feature has a token label"
    for n, side in enumerate(dash.sides):
        label = labels.get(n)
        assert side.HasField("label") == (label is not None)
        if label is None:
            continue
        got = side.label
        assert [t.id for t in got.tokens] == list(label.token_ids) and got.rule_size == label.size >= 1
        assert [t.text for t in got.tokens] == token_texts(tiny_gemma.tokenizer, list(label.token_ids))
        assert [t.share for t in got.tokens] == pytest.approx(list(label.shares))
        assert [(t.firings, t.occurrences) for t in got.tokens] == list(zip(label.firings, label.occurrences,
                                                                            strict=True))
        assert (got.precision, got.recall, got.f1) == pytest.approx((label.precision, label.recall, label.f1))
        assert 0 < got.f1 <= 1 and got.f1 == pytest.approx(float(d["label_f1"][n, feature]))
    near = [(names[stage], stage, i, c) for i, c in zip(d["neighbour_ids"][feature].tolist(),
                                                         d["neighbour_cos"][feature].tolist(), strict=True) if i >= 0]
    assert [(x.stage, x.stage_index, x.feature) for x in dash.neighbours] == [r[:3] for r in near]
    assert [x.cosine for x in dash.neighbours] == pytest.approx([r[3] for r in near])
    cross = [(names[g], g, i) for g, i in zip(d["cross_stage"][feature].tolist(), d["cross_ids"][feature].tolist(),
                                               strict=True) if i >= 0]
    assert [(x.stage, x.stage_index, x.feature) for x in dash.cross_stage_neighbours] == cross
    assert [c.feature for c in dash.cooccurring] == [i for i in d["cooccur_ids"][feature].tolist() if i >= 0]
    # the old fields, from the dashboard
    fired = int(d["count"][:, feature].sum())
    assert response.HasField("density") and response.density == pytest.approx(fired / tokens)
    every = [x for side in dash.sides for x in side.top_examples]
    assert [x.value for x in response.top_examples] == pytest.approx(sorted((x.value for x in every), key=abs,
                                                                            reverse=True))
    first = max(every, key=lambda x: abs(x.value))
    assert response.top_examples[0].text == tiny_gemma.decode([t.id for t in first.tokens], skip_special_tokens=False)
    assert response.top_examples[0].position == first.index


def test_explanation_and_meta_latents(browsing: Running, loaded: LoadedStack):
    feature = browsing.stub.GetFeature(pb.GetFeatureRequest(stage="resid1", feature=3), timeout=30)
    assert feature.explanation == EXPLANATIONS["resid1"][3]
    ids, values = meta_latents(loaded.stages[0], 3)
    assert feature.HasField("meta_latents") and feature.meta_latents.width == 32 and len(ids) > 0
    assert list(feature.meta_latents.ids) == ids.tolist()
    assert list(feature.meta_latents.values) == pytest.approx(values.tolist())
    other = browsing.stub.GetFeature(pb.GetFeatureRequest(stage="signed", feature=4), timeout=30)
    assert other.explanation == "" and not other.HasField("meta_latents")


def test_a_stack_without_dashboards_still_serves(browsing: Running):
    feature = browsing.stub.GetFeature(pb.GetFeatureRequest(stack="bare", stage="resid1", feature=3), timeout=30)
    assert not feature.HasField("dashboard") and not feature.HasField("density") and not feature.top_examples
    assert feature.explanation == "" and not feature.HasField("meta_latents") and len(feature.top_tokens) == 10
    code, message = refused(lambda: browsing.stub.ListFeatures(pb.ListFeaturesRequest(stack="bare", stage="resid1"),
                                                               timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "featurewire-train dashboards" in message
    no_notes = pb.SearchFeaturesRequest(stack="bare", explanation="cat")
    code, message = refused(lambda: browsing.stub.SearchFeatures(no_notes, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "neither explanations nor token labels" in message
    found = browsing.stub.SearchFeatures(pb.SearchFeaturesRequest(stack="bare", text=pb.TextQuery(text=TEXT)),
                                         timeout=30)
    assert found.total > 0 and not any(m.HasField("density") for m in found.features)


# -------------------------------------------------------------------------------------- SearchFeatures


def direct_codes(host, loaded: LoadedStack, text: str) -> tuple[list[int], dict[int, torch.Tensor]]:
    """The text's token ids and every stage's codes (T, H), computed here through the stack runtime."""
    runtime = StackRuntime.from_loaded(loaded)
    ids = host.tokenizer(text).input_ids
    with torch.inference_mode():
        captures = host.forward(torch.tensor([ids]), reads=runtime.hookpoints, logits=False).captures
        results = runtime.decompose({hp: captures[hp][0] for hp in runtime.hookpoints})
    return ids, {i: r.codes.float() for i, r in results.items()}


def test_search_by_text_ranks_features_by_their_real_activation(browsing: Running, loaded: LoadedStack, tiny_gemma):
    ids, codes = direct_codes(tiny_gemma, loaded, TEXT)
    expected = {}
    for stage, z in codes.items():  # every token but BOS
        peak, at = z[1:].abs().max(0)
        for f in peak.nonzero().flatten().tolist():
            expected[stage, f] = (float(peak[f]), 1 + int(at[f]), float(z[1 + int(at[f]), f]))
    request = pb.SearchFeaturesRequest(text=pb.TextQuery(text=TEXT), page_size=200)
    found = browsing.stub.SearchFeatures(request, timeout=30)
    assert found.stack == "tiny" and found.total == len(expected) and len(found.features) == min(200, len(expected))
    assert [(t.position, t.id) for t in found.tokens] == list(enumerate(ids))
    best = max(expected, key=lambda k: expected[k][0])
    assert (found.features[0].stage_index, found.features[0].feature) == best
    scores = [m.score for m in found.features]
    assert scores == sorted(scores, reverse=True)
    for m in found.features:
        score, position, value = expected[m.stage_index, m.feature]
        assert m.score == pytest.approx(score, rel=1e-4) and m.position == position
        assert m.stage == loaded.stages[m.stage_index].name and m.HasField("density")
        signed = loaded.stages[m.stage_index].signed
        assert m.sign == ((pb.SIGN_NEGATIVE if value < 0 else pb.SIGN_POSITIVE) if signed else pb.SIGN_UNSPECIFIED)
    # mean over a span of characters: " cat" covers tokens 2 and 3 (" c", "at") of this tokenizer
    offsets = tiny_gemma.tokenizer(TEXT, return_offsets_mapping=True)["offset_mapping"]
    covered = [p for p, (s, e) in enumerate(offsets) if e > s and s < 7 and e > 3]
    query = pb.TextQuery(text=TEXT, span=pb.Span(start=3, end=7), reduction=pb.REDUCTION_MEAN)
    span = browsing.stub.SearchFeatures(pb.SearchFeaturesRequest(text=query, stages=["resid1"]), timeout=30)
    mean = codes[0][covered].abs().mean(0)
    assert span.total == int((mean > 0).sum()) and all(m.stage == "resid1" for m in span.features)
    shown = len(span.features)
    assert shown == min(20, span.total) and shown > 0
    assert [m.feature for m in span.features] == mean.argsort(descending=True, stable=True)[:shown].tolist()
    assert [m.score for m in span.features] == pytest.approx(mean.sort(descending=True).values[:shown].tolist())


def brute_force_lens(host, loaded: LoadedStack, token: int, stages: list[int]) -> list[tuple[float, int, int]]:
    row = host.model.get_output_embeddings().weight[token].detach().float()  # (d,)
    out = []
    for i in stages:
        stage = loaded.stages[i]
        with torch.no_grad():
            scores = (stage.sae.W_dec.float() @ row) / stage.input_scale  # (H,)
        out += [(float(v), i, f) for f, v in enumerate(scores.tolist())]
    return out


def test_search_by_token_equals_the_brute_force_logit_lens(browsing: Running, loaded: LoadedStack, tiny_gemma):
    (token,) = tiny_gemma.tokenizer(" the", add_special_tokens=False).input_ids
    scores = brute_force_lens(tiny_gemma, loaded, token, [0, 1])
    request = pb.SearchFeaturesRequest(token=pb.TokenQuery(text=" the"), stages=["resid1", "signed"])
    found = pages(browsing.stub.SearchFeatures, request, 150)
    promotes = sorted(scores, key=lambda x: -x[0])  # stable: ties stay in (stage, feature) order
    assert [(m.stage_index, m.feature) for m in found] == [(s, f) for _, s, f in promotes]
    assert [m.score for m in found] == pytest.approx([v for v, _, _ in promotes], rel=1e-4, abs=1e-6)
    by_id = pb.SearchFeaturesRequest(token=pb.TokenQuery(id=token, direction=pb.TOKEN_DIRECTION_SUPPRESSES),
                                     stages=["signed", "resid1"], page_size=10)
    lowest = browsing.stub.SearchFeatures(by_id, timeout=30)
    assert lowest.total == 256 + 128 and lowest.next_page_token
    assert [(m.stage_index, m.feature) for m in lowest.features] == [(s, f) for _, s, f in sorted(scores)[:10]]


def word_table(loaded: LoadedStack, tokenizer) -> dict[tuple[int, int], tuple[set[str], float]]:
    """(stage, feature) -> (words of its explanation and its labels' rule tokens, best label F1), brute force."""
    out = {}
    for index, stage in enumerate(loaded.stages):
        f1 = stage.dashboard["label_f1"].max(0).values
        labelled = stage_labels(stage.dashboard)
        for f in range(stage.sae.d_sae):
            text = EXPLANATIONS.get(stage.name, {}).get(f, "") + " " + " ".join(
                token_texts(tokenizer, [t])[0] for label in labelled.get(f, []) for t in label.rule_ids)
            out[index, f] = (set(re.findall(r"\w+", text.lower())), float(f1[f]))
    return out


def expected_matches(table, words: set[str]) -> list[tuple[int, int, int]]:
    """(stage, feature, words matched) by words matched, then best label F1, then stage and feature."""
    hits = [(-len(words & found), -f1, s, f) for (s, f), (found, f1) in table.items() if words & found]
    return [(s, f, -n) for n, _, s, f in sorted(hits)]


def test_search_by_explanation_counts_matching_words(browsing: Running, loaded: LoadedStack, tiny_gemma):
    table = word_table(loaded, tiny_gemma.tokenizer)
    found = pages(browsing.stub.SearchFeatures, pb.SearchFeaturesRequest(explanation="CAT food, Dates!"), 50)
    assert [(m.stage_index, m.feature, m.score) for m in found] == expected_matches(table, {"cat", "food", "dates"})
    assert found[0].explanation == EXPLANATIONS["mlp2"][1]
    only = browsing.stub.SearchFeatures(pb.SearchFeaturesRequest(explanation="cat", stages=["resid1"]), timeout=30)
    assert [(m.stage, m.feature, m.score) for m in only.features] == [
        (loaded.stages[s].name, f, n) for s, f, n in expected_matches(table, {"cat"}) if s == 0]


def test_search_by_explanation_matches_token_labels(browsing: Running, loaded: LoadedStack, tiny_gemma):
    """A word of a label's rule tokens that no explanation holds finds the labelled features, best label F1 first,
    with each match's label and F1; so explanation search works on a stack without explanations."""
    table = word_table(loaded, tiny_gemma.tokenizer)
    explained = {w for table_ in EXPLANATIONS.values() for text in table_.values()
                 for w in re.findall(r"\w+", text.lower())}
    counts: dict[str, int] = {}
    for found, _ in table.values():
        for word in found - explained:
            counts[word] = counts.get(word, 0) + 1
    word = max(sorted(counts), key=lambda w: counts[w])  # the label word shared by the most features
    assert counts[word] >= 2
    found = pages(browsing.stub.SearchFeatures, pb.SearchFeaturesRequest(explanation=word), 7)
    expected = expected_matches(table, {word})
    assert [(m.stage_index, m.feature, m.score) for m in found] == expected and len(expected) == counts[word]
    f1s = [m.label_f1 for m in found]
    assert f1s == sorted(f1s, reverse=True) and all(0 < x <= 1 for x in f1s)
    for m in found:
        assert m.HasField("label_f1") and m.label_f1 == pytest.approx(table[m.stage_index, m.feature][1])
        assert word in m.label.lower() and "token F1" in m.label and word not in m.explanation.lower()


# ---------------------------------------------------------------------------------------- ListFeatures


@pytest.mark.parametrize(("stage", "sort", "descending", "low", "high"), [
    (1, pb.FEATURE_SORT_DENSITY, False, 0.001, 0.5), (0, pb.FEATURE_SORT_MAX, True, None, None),
    (3, pb.FEATURE_SORT_UNSPECIFIED, True, 0.0, 0.02), (1, pb.FEATURE_SORT_LABEL_F1, True, None, None),
    (2, pb.FEATURE_SORT_LABEL_F1, False, 0.001, 1.0)])
def test_list_features_filters_sorts_and_pages(browsing: Running, loaded: LoadedStack, stage, sort, descending, low,
                                               high):
    s = loaded.stages[stage]
    d = s.dashboard
    count = d["count"].sum(0)
    density = count.double() / s.dashboard_record["tokens"]
    peak = d["max"].max(0).values
    keep = [f for f in range(count.shape[0]) if (low or 0.0) <= float(density[f]) <= (1.0 if high is None else high)]
    f1 = d["label_f1"].max(0).values
    key = {pb.FEATURE_SORT_MAX: peak.double(), pb.FEATURE_SORT_LABEL_F1: f1.double()}.get(sort, density)
    expected = sorted(keep, key=lambda f: -float(key[f]) if descending else float(key[f]))  # ties by feature id
    request = pb.ListFeaturesRequest(stage=s.name, sort=sort, descending=descending)
    if low is not None:
        request.min_density = low
    if high is not None:
        request.max_density = high
    listed = pages(browsing.stub.ListFeatures, request, 7)
    assert [x.feature for x in listed] == expected
    for x in listed[:20]:
        assert x.density == pytest.approx(float(density[x.feature])) and x.max == pytest.approx(float(peak[x.feature]))
        fired = int(count[x.feature])
        assert x.mean == pytest.approx(float(d["sum"][:, x.feature].sum()) / fired if fired else 0.0, rel=1e-5)
        assert x.explanation == EXPLANATIONS.get(s.name, {}).get(x.feature, "")
        assert x.HasField("label_f1") and x.label_f1 == pytest.approx(float(f1[x.feature]))


def test_dead_features_and_the_response_header(browsing: Running, loaded: LoadedStack):
    dead = browsing.stub.ListFeatures(pb.ListFeaturesRequest(stage="mlp2", max_density=0.0, page_size=200), timeout=10)
    count = loaded.stages[2].dashboard["count"].sum(0)
    assert [x.feature for x in dead.features] == (count == 0).nonzero().flatten().tolist()
    assert (dead.stack, dead.stage, dead.stage_index, dead.tokens) == ("tiny", "mlp2", 2,
                                                                       loaded.stages[2].dashboard_record["tokens"])
    assert all(x.density == 0 and x.max == 0 for x in dead.features)


# ------------------------------------------------------------------------------------------ page tokens


def test_page_tokens_are_bound_to_their_query(browsing: Running):
    stub = browsing.stub
    request = pb.ListFeaturesRequest(stage="resid1", page_size=5)
    first = stub.ListFeatures(request, timeout=10)
    token = first.next_page_token
    assert token and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    second = stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_size=9, page_token=token), timeout=10)
    assert second.features[0].feature != first.features[0].feature  # page_size may change between pages
    assert [x.feature for x in second.features][:5] == [x.feature for x in stub.ListFeatures(
        pb.ListFeaturesRequest(stage="resid1", page_size=10), timeout=10).features][5:]
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    search = pb.SearchFeaturesRequest(token=pb.TokenQuery(id=5), page_size=3)
    search_token = stub.SearchFeatures(search, timeout=10).next_page_token
    bad = [
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_token=flipped), timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_token="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                                  timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_token=token + "="), timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_token="not a token!"), timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="signed", page_token=token), timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", descending=True, page_token=token),
                                  timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", max_density=0.5, page_token=token),
                                  timeout=10),
        lambda: stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", page_token=search_token), timeout=10),
        lambda: stub.SearchFeatures(pb.SearchFeaturesRequest(token=pb.TokenQuery(id=6), page_token=search_token),
                                    timeout=10),
        lambda: stub.SearchFeatures(pb.SearchFeaturesRequest(token=pb.TokenQuery(id=5), stages=["resid1"],
                                                             page_token=search_token), timeout=10),
        lambda: stub.SearchFeatures(pb.SearchFeaturesRequest(stack="bare", token=pb.TokenQuery(id=5),
                                                             page_token=search_token), timeout=10),
    ]
    for n, call in enumerate(bad):
        code, message = refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("page_token was not issued"), n
    resumed = stub.SearchFeatures(pb.SearchFeaturesRequest(token=pb.TokenQuery(id=5), page_token=search_token),
                                  timeout=10)
    assert resumed.total == 256 * 3 + 128 and len(resumed.features) == 20


# ------------------------------------------------------------------------------------------- bad input


def _search(**fields) -> pb.SearchFeaturesRequest:
    return pb.SearchFeaturesRequest(**fields)


def _text(text: str = TEXT, **fields) -> pb.SearchFeaturesRequest:
    return pb.SearchFeaturesRequest(text=pb.TextQuery(text=text, **fields))


BAD_SEARCHES = [
    (_search(stack="nope", explanation="cat"), grpc.StatusCode.NOT_FOUND, "stack 'nope' is not loaded"),
    (_search(explanation="cat", stages=["nope"]), grpc.StatusCode.NOT_FOUND, "stages[0] 'nope' is not a stage"),
    (_search(explanation="cat", stages=["mlp2", "mlp2"]), grpc.StatusCode.INVALID_ARGUMENT, "stages[1] 'mlp2' repeats"),
    (_search(), grpc.StatusCode.INVALID_ARGUMENT, "set exactly one query: text, token or explanation"),
    (_text(""), grpc.StatusCode.INVALID_ARGUMENT, "text.text is empty"),
    (_text("a b " * 1500), grpc.StatusCode.INVALID_ARGUMENT, "tokens; at most 2048 (Limits.max_prompt_tokens)"),
    (_text("x" * 200_000), grpc.StatusCode.INVALID_ARGUMENT, "text.text has 200000 characters; at most"),
    (_text(span=pb.Span(start=5, end=5)), grpc.StatusCode.INVALID_ARGUMENT, "text.span [5, 5) is empty"),
    (_text(span=pb.Span(start=2, end=23)), grpc.StatusCode.INVALID_ARGUMENT,
     "text.span.end 23 is past the end of the text (22 characters)"),
    (_text(reduction=9), grpc.StatusCode.INVALID_ARGUMENT, "text.reduction has unknown value 9"),
    (_text("<bos>"), grpc.StatusCode.INVALID_ARGUMENT, "only special tokens"),
    (_search(token=pb.TokenQuery(text=" cat sat")), grpc.StatusCode.INVALID_ARGUMENT,
     "token.text ' cat sat' encodes to"),
    (_search(token=pb.TokenQuery(text="")), grpc.StatusCode.INVALID_ARGUMENT, "token.text has 0 characters"),
    (_search(token=pb.TokenQuery(id=512)), grpc.StatusCode.INVALID_ARGUMENT, "token.id 512 is out of range: token ids"
                                                                             " are 0..511"),
    (_search(token=pb.TokenQuery()), grpc.StatusCode.INVALID_ARGUMENT, "token: set exactly one of token.text and"),
    (_search(token=pb.TokenQuery(id=3, direction=7)), grpc.StatusCode.INVALID_ARGUMENT, "token.direction has unknown"),
    (_search(explanation=""), grpc.StatusCode.INVALID_ARGUMENT, "explanation has 0 characters; send 1..1000"),
    (_search(explanation="?! ..."), grpc.StatusCode.INVALID_ARGUMENT, "has no words to match"),
    (_search(explanation="cat", page_size=201), grpc.StatusCode.INVALID_ARGUMENT,
     "page_size 201 is out of range: 1..200 (Limits.max_page_size), or 0 for 20"),
]


@pytest.mark.parametrize(("request_", "code", "fragment"), BAD_SEARCHES)
def test_bad_searches_name_the_field(browsing: Running, request_, code, fragment):
    got, message = refused(lambda: browsing.stub.SearchFeatures(request_, timeout=30))
    assert got == code and fragment in message, message


BAD_LISTS = [
    (pb.ListFeaturesRequest(stack="nope", stage="resid1"), grpc.StatusCode.NOT_FOUND, "stack 'nope' is not loaded"),
    (pb.ListFeaturesRequest(), grpc.StatusCode.INVALID_ARGUMENT, "stage is required"),
    (pb.ListFeaturesRequest(stage="nope"), grpc.StatusCode.NOT_FOUND, "stage 'nope' is not a stage of stack 'tiny'"),
    (pb.ListFeaturesRequest(stage="resid1", min_density=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     "min_density 1.5 is out of range: a density in [0, 1]"),
    (pb.ListFeaturesRequest(stage="resid1", max_density=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     "max_density nan is out of range"),
    (pb.ListFeaturesRequest(stage="resid1", min_density=0.5, max_density=0.1), grpc.StatusCode.INVALID_ARGUMENT,
     "min_density 0.5 is above max_density 0.1"),
    (pb.ListFeaturesRequest(stage="resid1", sort=9), grpc.StatusCode.INVALID_ARGUMENT, "sort has unknown value 9"),
    (pb.ListFeaturesRequest(stack="bare", stage="resid1", sort=pb.FEATURE_SORT_LABEL_F1),
     grpc.StatusCode.FAILED_PRECONDITION, "has no feature dashboards"),
    (pb.ListFeaturesRequest(stage="resid1", page_size=1000), grpc.StatusCode.INVALID_ARGUMENT,
     "page_size 1000 is out of range"),
]


@pytest.mark.parametrize(("request_", "code", "fragment"), BAD_LISTS)
def test_bad_lists_name_the_field(browsing: Running, request_, code, fragment):
    got, message = refused(lambda: browsing.stub.ListFeatures(request_, timeout=30))
    assert got == code and fragment in message, message


def test_feature_out_of_range_is_not_found_and_metrics_count_the_new_rpcs(browsing: Running):
    code, message = refused(lambda: browsing.stub.GetFeature(pb.GetFeatureRequest(stage="signed", feature=128),
                                                             timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "feature 128 is out of range" in message
    counted = [line for line in browsing.server.metrics.exposition().decode().splitlines()
               if line.startswith("featurewire_rpcs_total{")]
    for code, method in (("OK", "SearchFeatures"), ("INVALID_ARGUMENT", "ListFeatures")):
        assert any(f'code="{code}"' in line and f'method="{method}"' in line for line in counted), (code, method)
