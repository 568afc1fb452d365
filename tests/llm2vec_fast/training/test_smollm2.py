"""MNTP on the real default model (SmolLM2-135M-Instruct): the "_" mask token, two steps, the output loads."""
import pytest
import torch


@pytest.mark.slow
def test_smollm2_mntp_two_steps_and_load(tmp_path):
    try:
        from llm2vec_fast import resolve_model

        base = resolve_model(None)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default model unavailable: {e}")
    from transformers import AutoTokenizer

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.data import resolve_mask_token
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    text = tmp_path / "t.txt"
    text.write_text("\n".join(["The cat sat on the mat and looked at the garden for a long time."] * 20))
    args = MNTPArguments(train_files=[str(text)], output_dir=str(tmp_path / "out"), max_seq_length=32, batch_size=2,
                         max_steps=2, logging_steps=1, save_steps=0, learning_rate=1e-3, disable_tqdm=True,
                         release_layout=False)
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.mask_token is None
    assert resolve_mask_token(tok) == tok.convert_tokens_to_ids("_") != tok.unk_token_id  # "_" is one token
    r = train_mntp(args)
    assert len(r["losses"]) == 2 and all(0 < x["loss"] < 20 for x in r["losses"])
    enc = LLM2Vec.from_pretrained(base, peft_model_name_or_path=str(tmp_path / "out"), device="cpu")
    e = enc.encode(["a cat", "a dog"], show_progress_bar=False)
    assert e.shape == (2, 576) and torch.isfinite(e).all()
