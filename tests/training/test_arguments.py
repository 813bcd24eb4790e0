import os
import subprocess
import sys

import pytest

from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.config import ConfigError
from megatron_alcot.training.train import prepare

from _tiny import tiny_argv

MEGATRON_LINE = (
    "--num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 8 "
    "--group-query-attention --num-query-groups 4 --seq-length 256 --max-position-embeddings 512 "
    "--rotary-base 500000 --norm-epsilon 1e-6 --untie-embeddings-and-output-weights "
    "--init-method-std 0.02 --make-vocab-size-divisible-by 64 --micro-batch-size 2 "
    "--global-batch-size 16 --train-iters 100 --lr 2e-4 --min-lr 2e-5 --lr-decay-style linear "
    "--lr-decay-iters 90 --lr-warmup-fraction 0.02 --weight-decay 0.1 --adam-beta1 0.9 "
    "--adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 --bf16 --seed 42 --mock-data --split 98,1,1 "
    "--tokenizer-type NullTokenizer --vocab-size 1000 --tensor-model-parallel-size 1 "
    "--recompute-granularity full --recompute-method block --recompute-num-layers 2 "
    "--save /tmp/x --save-interval 10 --eval-interval 20 --eval-iters 3 --log-interval 5 "
    "--exit-signal-handler --exit-duration-in-mins 30 --max-nan-skips 4 --peak-flops 989 "
    "--num-workers 1 --normalization RMSNorm --swiglu --disable-bias-linear "
    "--position-embedding-type rope --use-flash-attn --latent-method alcot --latent-max-steps 3 "
    "--latent-threshold 0.2 --latent-router-init-prob 0.8 --latent-loss-weight 0.05 "
    "--latent-loss-beta 2 --latent-readout prob --latent-embed-scale 4"
).split()


def test_megatron_command_line_round_trips():
    args = parse_args(MEGATRON_LINE)
    m, t, o = args.model, args.train, args.optim
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (4, 128, 352, 8)
    assert (m.num_query_groups, m.seq_length, m.max_position_embeddings) == (4, 256, 512)
    assert (m.rotary_base, m.norm_epsilon, m.init_method_std) == (500000.0, 1e-6, 0.02)
    assert m.untie_embeddings_and_output_weights and m.make_vocab_size_divisible_by == 64
    assert (m.latent_method, m.latent_max_steps, m.latent_threshold) == ("alcot", 3, 0.2)
    assert (m.latent_router_init_prob, m.latent_loss_weight, m.latent_loss_beta) == (0.8, 0.05, 2.0)
    assert (m.latent_readout, m.latent_embed_scale) == ("prob", 4.0)
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.seed) == (2, 16, 100, 42)
    assert t.bf16 and not t.fp16 and t.recompute_granularity == "full"
    assert (t.recompute_method, t.recompute_num_layers) == ("block", 2)
    assert (t.save, t.save_interval, t.eval_interval, t.eval_iters) == ("/tmp/x", 10, 20, 3)
    assert t.exit_signal_handler and t.exit_duration_in_mins == 30 and t.max_nan_skips == 4
    assert t.peak_flops == 989
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_decay_iters) == (2e-4, 2e-5, "linear", 90)
    assert (o.lr_warmup_fraction, o.weight_decay, o.adam_beta2, o.clip_grad) == (0.02, 0.1, 0.95, 1.0)
    assert args.data.mock_data and args.data.split == "98,1,1" and args.data.vocab_size == 1000
    assert args.data.num_workers == 1 and args.logging.log_interval == 5
    args, tok, world = prepare(args)
    assert world == 1 and args.model.vocab_size == tok.vocab_size
    # the stored configuration is plain data
    assert args.to_dict()["model"]["num_query_groups"] == 4


def test_defaults_follow_megatron():
    args = parse_args(tiny_argv())
    assert args.model.untie_embeddings_and_output_weights is False   # tied unless the flag is given
    assert args.train.seed == 7 and args.optim.lr_decay_style == "cosine"


@pytest.mark.parametrize("override, flag", [
    ({"global_batch_size": 7}, "--global-batch-size"),
    ({"hidden_size": 66}, "--hidden-size"),
    ({"num_layers": 0}, "--num-layers"),
    ({"min_lr": 1.0}, "--min-lr"),
    ({"lr_warmup_iters": 100}, "--lr-decay-iters"),
    ({"latent_threshold": 1.5}, "--latent-threshold"),
    ({"tensor_model_parallel_size": 2}, "--tensor-model-parallel-size"),
    ({"pipeline_model_parallel_size": 2}, "--pipeline-model-parallel-size"),
    ({"sequence_parallel": None}, "--sequence-parallel"),
    ({"mock_data": False, "data_path": "/nonexistent/corpus"}, "--data-path"),
    ({"tokenizer_type": "SentencePieceTokenizer"}, "--tokenizer-model"),
    ({"bf16": None, "fp16": None}, "--fp16"),
    ({"save_interval": 5}, "--save"),
    ({"exit_signal_handler": None}, "--save"),
    ({"max_nan_skips": 0}, "--max-nan-skips"),
    ({"peak_flops": -1}, "--peak-flops"),
    ({"recompute_method": "block"}, "--recompute-method"),
    ({"clip_grad": -1}, "--clip-grad"),
    ({"train_iters": False}, "--train-iters"),
    ({"log_interval": 0}, "--log-interval"),
])
def test_bad_values_name_the_flag(override, flag):
    with pytest.raises(ConfigError, match=flag):
        prepare(parse_args(tiny_argv(**override)))


def test_pipeline_parallel_is_accepted():
    validate_args(parse_args(tiny_argv(pipeline_model_parallel_size=2, num_layers=2)), world_size=2)


def test_unknown_flag_suggests_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(tiny_argv() + ["--hiden-size", "64"])
    assert exc.value.code == 2
    assert "did you mean --hidden-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:          # wrong type: argparse names the flag
        parse_args(tiny_argv(lr="fast"))
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(tiny_argv(normalization="LayerNorm"))


def test_cli_prints_clean_error_and_exit_code_2():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "pretrain_alcot.py")] + tiny_argv(global_batch_size=7)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 2
    assert "--global-batch-size" in proc.stderr and "Traceback" not in proc.stderr
