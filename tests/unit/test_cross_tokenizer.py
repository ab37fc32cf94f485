"""Cross-tokenizer KD: the alignment of two tokenizations (data/alignment.py) and the uld and hybrid terms
(objectives/cross_tokenizer.py), against hand-written formulas, the same-tokenizer term and TRL's GOLD."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ds_distill.config.losses import KDOptions
from ds_distill.data import IGNORE_INDEX
from ds_distill.data.alignment import align, token_bytes, token_ends
from ds_distill.objectives import cross_tokenizer, logits
from ds_distill.objectives.cross_tokenizer import VocabularyMatch
from ds_distill.objectives.divergences import divergence
from ds_distill.objectives.logits import LogitDistillationLoss


def test_tokens_end_at_the_byte_where_their_text_ends():
    # "Hello worldé le": BOS (0, 0), "Hello" (0, 5), " wor" trimmed to (6, 9), "ld" (9, 11), the two bytes of "é"
    # sharing its span (11, 12), a lone `▁` given the next character's span (13, 14) before "le" (13, 15), EOS
    offsets = [(0, 0), (0, 5), (6, 9), (9, 11), (11, 12), (11, 12), (13, 14), (13, 15), (0, 0)]
    pieces = [b"<s>", b"Hello", b" wor", b"ld", b"\xc3", b"\xa9", b" ", b"le", b"</s>"]
    # bytes: "é" is 2 of them, so the space after it ends at byte 14 and "le" at 16
    assert token_ends(offsets, "Hello worldé le", pieces) == [0, 5, 9, 11, 12, 13, 14, 16, 16]
    # one token for the whole character: it ends after both bytes; unknown pieces end only the run's last token
    assert token_ends([(0, 1)], "é") == [2]
    assert token_ends([(0, 1), (0, 1)], "é") == [0, 2]


@pytest.mark.parametrize(
    "student, teacher, groups",
    [
        ([5, 9, 11], [5, 11], [([0], [0]), ([1, 2], [1])]),  # " wor" "ld" | " world"
        ([5, 11], [5, 9, 11], [([0], [0]), ([1], [1, 2])]),
        ([0, 5, 11], [5, 11], [([0, 1], [0]), ([2], [1])]),  # a BOS on one side joins the group after it
        ([5, 11, 11], [5, 11, 11], [([0], [0]), ([1], [1]), ([2], [2])]),  # EOS on both: a group of its own
        ([5, 11, 11], [5, 11], [([0], [0]), ([1], [1])]),  # EOS on one side only: in no group
        ([3, 7, 12, 14], [7, 9, 13], [([0, 1], [0])]),  # truncated differently: after 7 no common end
        ([5, 11], [4, 6, 11], [([0, 1], [0, 1, 2])]),
        ([0, 2], [1, 2], [([0, 1], [0, 1])]),  # "Ö" as `▁` `Ö` and as its two bytes
        ([5, 5, 11], [5, 11], [([0], [0]), ([1, 2], [1])]),  # a special token within the text joins the next group
    ],
)
def test_groups_close_where_both_sides_end_at_one_character(student, teacher, groups):
    assert align(student, teacher) == groups


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    from tests import tiny_models

    rows = [json.loads(line)["translation"] for line in open(tiny_models.SHARED_DATA / "train.jsonl")][:2000]
    lines = [row[lang] for row in rows for lang in ("en", "de")]
    sentencepiece = tiny_models.train_tokenizer(tmp_path_factory.mktemp("sp"), vocab_size=500)
    return sentencepiece, tiny_models.byte_level_tokenizer(lines), lines


def test_groups_of_two_tokenizer_families_cover_the_same_text(two_families):
    """A SentencePiece (T5-style, `▁`, EOS appended) and a byte-level BPE tokenizer (`Ġ`, bytes of a character
    split) on real German and English text, an emoji and accents added: each group decodes to the same text on
    both sides, and every token before the last group is in one."""
    sentencepiece, byte_level, lines = two_families
    texts = [*lines[-40:], "Grüße aus Köln 🙂 und  zwei  Leerzeichen.", "naïve café"]
    pieces = {tokenizer: token_bytes(tokenizer) for tokenizer in (sentencepiece, byte_level)}

    def tokens(tokenizer, text):
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        return ids, token_ends(encoded["offset_mapping"], text, [pieces[tokenizer][i] for i in ids])

    multi_token_groups = 0
    for text in texts:
        sides = [tokens(tokenizer, text) for tokenizer in (sentencepiece, byte_level)]
        for tokenizer in (sentencepiece, byte_level):  # one tokenizer on both sides: a group per token
            ids, ends = tokens(tokenizer, text)
            assert align(ends, ends) == [([i], [i]) for i in range(len(ids))], text
        groups = align(sides[0][1], sides[1][1])
        assert groups and len(groups) >= min(len(sides[0][0]), len(sides[1][0])) // 3, text
        for s_group, t_group in groups:
            if sentencepiece.unk_token_id in [sides[0][0][i] for i in s_group]:  # `<unk>` decodes to nothing
                continue
            s_text, t_text = (tok.decode([ids[i] for i in group], skip_special_tokens=True)
                              for tok, (ids, _), group in zip((sentencepiece, byte_level), sides, (s_group, t_group)))  # fmt: skip
            assert s_text.strip() == t_text.strip(), (text, s_text, t_text)
            multi_token_groups += len(s_group) > 1 or len(t_group) > 1
        flat = [i for s_group, _ in groups for i in s_group]
        assert flat == list(range(len(flat)))
    assert multi_token_groups > 20


def test_packed_blocks_across_tokenizers_hold_the_same_text_on_both_sides(two_families):
    """Packed causal LM text: the student's blocks are the ones a same-tokenizer run packs; beside each, the
    teacher's tokens of its text. Once the collator leaves out each block's first group (which holds the tokens
    no logit predicts, where the two sides may start at different bytes), every group decodes to the same text
    on both sides, documents end at a group of the two EOS tokens, and most of each block is in a group."""
    from ds_distill.config.run import DataConfig
    from ds_distill.data import batches, packing
    from ds_distill.data.alignment import TEACHER_VIEW, AlignedCollator

    student, teacher, lines = two_families
    data = DataConfig(task="causal_lm", block_size=24)
    documents = {"text": [*lines[:60], "Grüße aus Köln 🙂 und  zwei  Leerzeichen.", *lines[60:80]]}
    rows = packing.aligned_causal_lm_rows(data, student, teacher)(documents)
    assert rows["input_ids"] == packing.causal_lm_rows(data, student)(documents)["input_ids"]
    assert len(rows["input_ids"]) > 20
    collate = AlignedCollator(batches.make_collator(data, student),
                              batches.make_collator(data, teacher, rows_vary=True), (1, 1))  # fmt: skip
    examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
    batch = collate(examples)
    eos_groups = 0
    for b, example in enumerate(examples):
        s_ids, t_ids = example["input_ids"], example[TEACHER_VIEW + "input_ids"]
        s_group, t_group = batch["align_group"][b], batch["teacher.align_group"][b]
        assert (s_group >= 0).float().mean() > 0.6
        for number in s_group[s_group >= 0].unique().tolist():
            # logits at t predict the token at t + 1
            s_tokens = [s_ids[i + 1] for i in (s_group == number).nonzero().squeeze(1).tolist()]
            t_tokens = [t_ids[i + 1] for i in (t_group == number).nonzero().squeeze(1).tolist()]
            if s_tokens == [student.eos_token_id]:
                assert t_tokens == [teacher.eos_token_id]
                eos_groups += 1
            if student.unk_token_id in s_tokens:  # `<unk>` decodes to nothing
                continue
            s_text, t_text = (
                student.decode(s_tokens, skip_special_tokens=True),
                teacher.decode(t_tokens, skip_special_tokens=True),
            )
            assert s_text.strip() == t_text.strip(), (s_text, t_text)
    assert eos_groups >= 40


def test_a_vocabulary_matches_by_text_across_spellings(two_families):
    sentencepiece, byte_level, _ = two_families
    match = VocabularyMatch.of(sentencepiece, byte_level)
    texts = token_bytes(sentencepiece), token_bytes(byte_level)
    pairs = list(zip(match.student_ids.tolist(), match.teacher_ids.tolist()))
    assert len(pairs) > 50 and all(texts[0][s] == texts[1][t] for s, t in pairs)
    assert any(texts[0][s].startswith(b" ") for s, _ in pairs)  # `▁der` and `Ġder` are one text
    assert len(set(match.student_ids.tolist())) == len(pairs) == len(set(match.teacher_ids.tolist()))
    same = VocabularyMatch.of(byte_level, byte_level)
    assert same.matched_share == 1.0 and torch.equal(same.teacher_ids, same.student_ids)


# -- the terms -----------------------------------------------------------------------------------------------------
def features(groups, student_vocab, teacher_vocab, seed=0, pad=(1, 2), ungrouped=2):
    """Student and teacher features for one example whose target tokens form `groups` ([(student count, teacher
    count)]), after `pad` ignored positions on each side, random logits and labels; the student's last
    `ungrouped` targets in no group (text the teacher's side was cut before)."""
    generator = torch.Generator().manual_seed(seed)
    sides = []
    for side, (vocab, before) in enumerate(((student_vocab, pad[0]), (teacher_vocab, pad[1]))):
        counts = [group[side] for group in groups]
        targets = sum(counts)
        labels = torch.full((1, before + targets + 3), IGNORE_INDEX)
        labels[0, before : before + targets] = torch.randint(vocab, (targets,), generator=generator)
        group_of = torch.full_like(labels, -1)
        group_of[0, before : before + targets] = torch.repeat_interleave(
            torch.arange(len(groups)), torch.tensor(counts)
        )
        sides.append({"logits": 3 * torch.randn(1, labels.shape[1], vocab, generator=generator, dtype=torch.float64),
                      "labels": labels, "align_group": group_of})  # fmt: skip
    student, teacher = sides
    if ungrouped:
        student["labels"][0, -ungrouped:] = torch.randint(student_vocab, (ungrouped,), generator=generator)
    teacher_last = [int((teacher["align_group"][0] == g).nonzero().max()) for g in range(len(groups))]
    row = torch.full_like(student["labels"], -1)
    for g in range(len(groups)):
        row[0, int((student["align_group"][0] == g).nonzero().max())] = teacher_last[g]
    student["align_teacher_row"] = row
    student["logits"].requires_grad_(True)
    return student, teacher


def kd_term(options: dict, match: VocabularyMatch) -> LogitDistillationLoss:
    loss = LogitDistillationLoss(KDOptions(**options))
    loss.vocabulary_match = match
    return loss


def value_and_grad(loss, student, teacher, breaks=True):
    student = dict(student)
    if breaks:  # what the collator hands over: where a chunk may end
        rows = (student["labels"].flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        student["chunk_breaks"] = cross_tokenizer.chunk_breaks(student["align_group"].flatten()[rows])
    value = loss(student, teacher)
    (grad,) = torch.autograd.grad(value, student["logits"])
    return value.detach(), grad


def merged(log_probs, labels, rows):
    """A group's merged log-distribution written out: the last row's, plus each earlier row's label log-prob."""
    return log_probs[rows[-1]] + sum(log_probs[r, labels[r]] for r in rows[:-1])


def reference(kind, kd, match, student, teacher):
    """The term as the module docstring states it, one group at a time, in plain autograd."""
    total, temperature = 0.0, kd["temperature"]
    log_s = F.log_softmax(student["logits"][0] / temperature, -1)
    log_t = F.log_softmax(teacher["logits"][0] / temperature, -1)
    groups = int(student["align_group"].max()) + 1
    for g in range(groups):
        s_rows = (student["align_group"][0] == g).nonzero().squeeze(1).tolist()
        t_rows = (teacher["align_group"][0] == g).nonzero().squeeze(1).tolist()
        q, p = merged(log_s, student["labels"][0], s_rows), merged(log_t, teacher["labels"][0], t_rows)
        l1 = temperature * cross_tokenizer.sorted_l1(p.exp()[None], q.exp()[None])[0]
        if kind == "uld":
            total = total + l1
            continue
        t_ids, s_ids = match.teacher_ids, match.student_ids
        kl = divergence(kd.get("divergence", "forward_kl"), p[t_ids], q[s_ids], 0.5, 0.1) * temperature**2
        rest_t = [i for i in range(len(p)) if i not in set(t_ids.tolist())]
        rest_s = [i for i in range(len(q)) if i not in set(s_ids.tolist())]
        rest = temperature * cross_tokenizer.sorted_l1(p.exp()[None, rest_t], q.exp()[None, rest_s])[0]
        weight = kd.get("hybrid_matched_weight") or match.matched_share
        total = total + weight * kl + (1 - weight) * rest
    return total / int((student["labels"] != IGNORE_INDEX).sum())


GROUPS = [(1, 1), (2, 1), (1, 3), (3, 2), (1, 1)]


@pytest.mark.parametrize("kind, divergence_name, matched_weight",
                         [("uld", "forward_kl", None), ("hybrid", "forward_kl", None), ("hybrid", "jsd", None),
                          ("hybrid", "forward_kl", 0.9)])  # fmt: skip
def test_the_terms_equal_their_formulas_across_chunks(kind, divergence_name, matched_weight):
    """Merged groups of several tokens on either side, vocabularies of 11 and 7 ids with 4 in common, T = 2; the
    chunked pass (chunks of 2 rows, never splitting a group of 3) against the formula, value and gradient; hybrid
    weighted by the matched share (4/7, GOLD's) or by `hybrid_matched_weight`."""
    match = VocabularyMatch(torch.tensor([0, 2, 3, 6]), torch.tensor([5, 1, 0, 10]), teacher_vocab=7, student_vocab=11)
    kd = {"cross_tokenizer": kind, "divergence": divergence_name, "temperature": 2.0}
    if matched_weight is not None:
        kd["hybrid_matched_weight"] = matched_weight
    student, teacher = features(GROUPS, 11, 7)
    expected = reference(kind, kd, match, student, teacher)
    (expected_grad,) = torch.autograd.grad(expected, student["logits"])
    with logits.chunk_elements(2 * 11):
        value, grad = value_and_grad(kd_term(kd, match), student, teacher)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_hybrid_with_one_tokenizer_is_the_same_tokenizer_term(name):
    """Every token its own group and every id matched: the cross-tokenizer path gives today's KD term (T = 2)."""
    vocab = 13
    student, teacher = features([(1, 1)] * 9, vocab, vocab, seed=1, pad=(2, 2), ungrouped=0)
    teacher = {**teacher, "logits": teacher["logits"], "labels": student["labels"]}
    teacher["align_group"] = student["align_group"]
    student["align_teacher_row"] = torch.where(
        student["align_group"] >= 0, torch.arange(student["labels"].shape[1]), -1
    )
    same = LogitDistillationLoss(KDOptions(divergence=name, temperature=2.0))
    ids = torch.arange(vocab)
    cross = kd_term({"cross_tokenizer": "hybrid", "divergence": name, "temperature": 2.0},
                    VocabularyMatch(ids, ids, vocab, vocab))  # fmt: skip
    expected, expected_grad = value_and_grad(same, student, teacher, breaks=False)
    with logits.chunk_elements(3 * vocab):
        value, grad = value_and_grad(cross, student, teacher)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-12)


def test_a_merged_group_holds_the_probability_of_its_text():
    """A group of two tokens: its merged row sums to the probability of its first token (the last row's
    distribution sums to one), so exp(merged)[y2] = p(y1) p(y2 | y1)."""
    log_probs = F.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    labels = torch.tensor([3, 1])
    rows = cross_tokenizer.merged_rows(log_probs, labels, torch.tensor([0, 0]), torch.tensor([False, True]))
    assert rows.exp().sum().item() == pytest.approx(math.exp(log_probs[0, 3].item()))
    assert rows[0, 1].item() == pytest.approx(log_probs[0, 3].item() + log_probs[1, 1].item())


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"losses.kd.cross_tokenizer": "gold"},
            "losses.kd.cross_tokenizer 'gold' is unknown; choose one of uld, hybrid",
        ),
        ({"losses.cka": {"weight": 1.0}}, "losses cka compare the two models position by position"),
        ({"losses.kd.hybrid_matched_weight": 1.5}, "losses.kd.hybrid_matched_weight must lie between 0 and 1"),
        ({"teacher.cache": "/nonexistent"}, "does not work with teacher.cache yet"),
        ({"losses.kd.on_policy": {"fraction": 0.5}}, "does not work with losses.kd.on_policy yet"),
        ({"data.targets": "teacher"}, "does not work with data.targets yet"),
    ],
)
def test_what_does_not_work_across_tokenizers_is_refused_before_weights_load(tiny, tmp_path, override, message):
    from ds_distill.config.load import load_config
    from ds_distill.errors import ConfigError
    from ds_distill.train.prepare import check_models
    from tests.conftest import translation_config, write_yaml

    config = translation_config(tiny, tmp_path / "run")
    config["losses"]["kd"]["cross_tokenizer"] = "hybrid"
    path = write_yaml(tmp_path / "run.yaml", config)
    with pytest.raises(ConfigError, match=message):
        check_models(load_config(str(path), overrides=override))


@pytest.mark.parametrize("kind", [None, "uld"])
def test_a_hybrid_weight_without_the_hybrid_term_is_refused(kind):
    from ds_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="hybrid_matched_weight weights the hybrid term; set losses.kd.cross_tok"):
        KDOptions(cross_tokenizer=kind, hybrid_matched_weight=0.9)


def test_masked_lm_across_tokenizers_is_refused(tiny, tmp_path):
    from ds_distill.config.load import load_config
    from ds_distill.errors import ConfigError
    from ds_distill.train.prepare import check_models
    from tests.conftest import causal_lm_config, write_yaml

    config = causal_lm_config(tiny, tmp_path / "run", teacher={"model_name_or_path": str(tiny["bert"])},
                              student={"init": {"from_teacher": {"encoder_layers": 1, "d_model": 32}}})  # fmt: skip
    config["data"]["task"] = "masked_lm"
    config["losses"] = {"kd": {"cross_tokenizer": "uld"}}
    with pytest.raises(ConfigError, match="masked_lm is not aligned"):
        check_models(load_config(str(write_yaml(tmp_path / "run.yaml", config))))


def test_several_students_and_chains_across_tokenizers_are_refused(tiny, tmp_path):
    from ds_distill.chain import parse
    from ds_distill.config.load import parse_students
    from ds_distill.errors import ConfigError
    from ds_distill.train.prepare import prepare_students
    from tests.conftest import translation_config

    cross = {"losses": {"kd": {"cross_tokenizer": "uld"}}}
    runs = parse_students({**translation_config(tiny, tmp_path / "run"), "students": {"a": cross, "b": {}}})
    with pytest.raises(ConfigError, match="students.a: losses.kd.cross_tokenizer does not work with several students"):
        prepare_students(runs, resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="stage s: losses.kd.cross_tokenizer does not work in a chain yet"):
        parse({"output_dir": str(tmp_path), "defaults": {}, "stages": [{"name": "s", **cross}]})


def test_a_student_vocabulary_of_its_own_needs_kd_across_tokenizers(tiny, tmp_path):
    from ds_distill.config.load import load_config
    from ds_distill.errors import ConfigError
    from tests.conftest import translation_config, write_yaml

    config = translation_config(tiny, tmp_path / "run")
    config["student"]["init"]["from_teacher"]["tokenizer"] = str(tiny["tokenizer"])
    with pytest.raises(ConfigError, match="another vocabulary than the teacher's: set losses.kd.cross_tokenizer"):
        load_config(str(write_yaml(tmp_path / "run.yaml", config)))


def test_on_two_byte_level_tokenizers_the_groups_and_terms_are_trls(two_families, monkeypatch):
    """A decoder pair of two byte-level BPE tokenizers of different sizes (GOLD aligns only those) on real
    sentences with multi-byte characters: our groups (from character offsets, to the byte) are TRL's (from its
    own byte offsets), and uld and hybrid on them equal TRL's ULDLoss (bayesian merge) on the same logits. The
    one difference: GOLD floors probabilities at 1e-8 before the logarithms of its matched term, where merged
    rows of long groups fall (the forward KL then differs by 20%); with the floor lifted they agree to 1e-12."""
    floor = torch.Tensor.clamp_min
    monkeypatch.setattr(torch.Tensor, "clamp_min", lambda x, low: x if low == 1e-8 else floor(x, low))
    from types import SimpleNamespace

    from tests import tiny_models

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    trl_utils = pytest.importorskip("trl.experimental.utils")

    _, _, lines = two_families
    student_tok = tiny_models.byte_level_tokenizer(lines, vocab_size=300)
    teacher_tok = tiny_models.byte_level_tokenizer(lines, vocab_size=700)
    match = VocabularyMatch.of(student_tok, teacher_tok)
    generator = torch.Generator().manual_seed(0)
    for completion in ("Grüße aus Köln, sagte der Präsident.", lines[-1], lines[-2]):
        ours_side, theirs_side = [], []
        for tok in (student_tok, teacher_tok):
            ((ids, byte_offsets),) = trl_utils.encode_with_byte_offsets(tok.backend_tokenizer, [completion])
            encoded = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
            assert encoded["input_ids"] == ids
            ends = token_ends(encoded["offset_mapping"], completion, [token_bytes(tok)[i] for i in ids])
            assert ends == [end for _, end in byte_offsets]  # TRL's byte offsets end where ours do
            prompt = [1]  # one prompt token: the first completion token has a logit that predicts it
            full = torch.tensor([prompt + ids])
            logits_ = 2 * torch.randn(1, full.shape[1], len(tok), generator=generator, dtype=torch.float64)
            labels = full.clone()
            labels[0, : len(prompt)] = IGNORE_INDEX
            offsets = torch.tensor([[(0, 0)] * len(prompt) + list(byte_offsets)])
            theirs_side.append((logits_, labels, full, offsets))
            ours_side.append((logits_, full, ends))
        groups = align(ours_side[0][2], ours_side[1][2])
        s_groups, t_groups = gold.ULDLoss._align_by_byte_offsets(theirs_side[0][3][0, 1:].tolist(),
                                                                 theirs_side[1][3][0, 1:].tolist())  # fmt: skip
        assert [g for g, _ in groups] == s_groups and [g for _, g in groups] == t_groups
        assert any(len(s) > 1 or len(t) > 1 for s, t in groups)

        def features(logits_, ids, side, groups=groups):
            group_of = torch.tensor([[g for g, pair in enumerate(groups) for _ in pair[side]]])
            return {"logits": logits_[:, :-1], "labels": ids[:, 1:], "align_group": group_of}

        student = features(ours_side[0][0].clone().requires_grad_(True), ours_side[0][1], 0)
        teacher = features(ours_side[1][0], ours_side[1][1], 1)
        student["align_teacher_row"] = torch.full_like(student["labels"], -1)
        student["align_teacher_row"][0, [s[-1] for s, _ in groups]] = torch.tensor([t[-1] for _, t in groups])
        for kind, divergence_name, beta in (("uld", "forward_kl", 0.5), ("hybrid", "jsd", 0.5),
                                            ("hybrid", "forward_kl", 0.0)):  # fmt: skip
            config = SimpleNamespace(
                uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=kind == "hybrid",
                uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=beta,
            )  # fmt: skip
            peer = gold.ULDLoss(config, student_tok, teacher_tok)
            (s_logits, s_labels, s_ids, s_offsets), (t_logits, t_labels, t_ids, t_offsets) = theirs_side
            theirs = peer(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)
            kd = {"cross_tokenizer": kind, "divergence": divergence_name, "temperature": 1.0}
            value = kd_term(kd, match)(student, teacher)
            targets = int((student["labels"] != IGNORE_INDEX).sum())
            assert value.item() * targets == pytest.approx(theirs.item() * len(groups), rel=1e-12), kind


@pytest.mark.parametrize("verb", ["cache_teacher", "generate_targets"])
def test_the_teacher_output_verbs_refuse_a_run_across_tokenizers(tiny, tmp_path, verb):
    from tests.conftest import run_verb, translation_config, write_yaml

    config = translation_config(tiny, tmp_path / "run")
    config["losses"]["kd"]["cross_tokenizer"] = "uld"
    path = write_yaml(tmp_path / "run.yaml", config)
    result = run_verb(verb, f"--config={path}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and f"{verb} does not work across tokenizers yet" in result.stderr
    assert not (tmp_path / "out").exists()


def test_byte_fallback_tokens_match_bytes_and_a_vocabulary_matches_itself():
    """SentencePiece's byte fallback spells "A" twice (`A`, `<0x41>`) and a space twice (`▁`, `<0x20>`): a byte token
    matches only a byte token, so one tokenizer still matches itself id for id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<0x41>", "<0x20>", "<0xC3>", "A", "▁", "▁der", "ü"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert VocabularyMatch.of(tokenizer, tokenizer).identity
    assert token_bytes(tokenizer)[1] == token_bytes(tokenizer)[4] == b"A"  # one text, two kinds of token


def test_plan_takes_a_run_across_tokenizers(tiny, tmp_path):
    from tests.conftest import run_verb, translation_config, write_yaml

    config = translation_config(tiny, tmp_path / "run")
    config["losses"]["kd"]["cross_tokenizer"] = "hybrid"
    result = run_verb("plan", f"--config={write_yaml(tmp_path / 'run.yaml', config)}", "--gpus_per_node=1")
    assert result.returncode == 0, result.stderr
    assert "losses.kd.cross_tokenizer: traced as the same-tokenizer KD term" in result.stdout


def test_a_vocabulary_of_its_own_cut_by_importance_needs_the_teachers_tokens(tiny, tmp_path):
    from ds_distill.config.load import load_config
    from ds_distill.errors import ConfigError
    from tests.conftest import translation_config, write_yaml

    config = translation_config(tiny, tmp_path / "run")
    config["losses"] = {"ce": {"weight": 1.0}}
    config["student"]["init"]["from_teacher"].update(strategy="sliced", tokenizer=str(tiny["tokenizer"]))
    with pytest.raises(ConfigError, match="with width importance: the teacher ranks channels on its own tokens"):
        load_config(str(write_yaml(tmp_path / "run.yaml", config)))
