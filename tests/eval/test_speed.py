from lowbit.eval import measure_throughput


def test_throughput_is_positive(model):
    r = measure_throughput(model, prompt_len=8, new_tokens=4, batch=2, warmup=1, repeats=2)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["peak_rss_mb"] > 0
    assert (r["prompt_len"], r["new_tokens"], r["batch"]) == (8, 4, 2)


def test_throughput_hands_the_model_back_in_its_mode(make_llama):
    m = make_llama().train()
    measure_throughput(m, prompt_len=4, new_tokens=2, warmup=0, repeats=1)
    assert m.training
