"""Shared tiny command line for the training tests (mock data, NullTokenizer, CPU)."""


def tiny_argv(**overrides):
    flags = {
        "--num-layers": 2, "--hidden-size": 64, "--num-attention-heads": 4, "--seq-length": 32,
        "--micro-batch-size": 2, "--global-batch-size": 8, "--train-iters": 6, "--lr": 3e-3,
        "--lr-warmup-iters": 1, "--min-lr": 3e-4, "--mock-data": None,
        "--tokenizer-type": "NullTokenizer", "--vocab-size": 128, "--make-vocab-size-divisible-by": 64, "--log-interval": 1,
        "--eval-iters": 0, "--num-workers": 0, "--latent-max-steps": 2, "--seed": 7,
        "--quiet": None,
    }
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            flags.pop(flag, None)
        else:
            flags[flag] = value
    argv = []
    for flag, value in flags.items():
        argv.append(flag)
        if value is not None and value is not True:
            argv.append(str(value))
    return argv
