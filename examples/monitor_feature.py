"""Watch one SAE feature live while the model generates: its value at every new token, as it streams.

    python examples/monitor_feature.py --target localhost:50051 --prompt "I think that dogs are"
    python examples/monitor_feature.py --stage blocks.6.hook_resid_post --feature 123

Without --stage/--feature it watches the strongest feature of the default stack's first stage at the
prompt's last token. Uses only the featurewire client library.
"""

from __future__ import annotations

import argparse

from featurewire import Client, DecomposeOptions, Finished, Token


def strongest_feature(client: Client, prompt: str, stage: str) -> int:
    """The feature with the largest |value| at the prompt's last token."""
    last = list(client.decompose(prompt, stages=stage, top_k=1, include_error=False))[-1]
    return last.stage(stage).ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--prompt", default="I think that dogs are")
    parser.add_argument("--stage", help="stage name (default: the first stage of the default stack)")
    parser.add_argument("--feature", type=int, help="feature id (default: the strongest at the prompt's end)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    with Client(args.target) as client:
        stage = args.stage or client.info().stack().stages[0].name
        feature = args.feature if args.feature is not None else strongest_feature(client, args.prompt, stage)
        print(f"watching feature {feature} of {stage}\n")
        # `always` reports the watched feature at every token, whether or not it is in the top-k.
        watch = DecomposeOptions(stages=(stage,), top_k=3, always={stage: [feature]})
        for event in client.generate(args.prompt, decompose=watch, max_new_tokens=args.max_new_tokens, seed=0):
            if isinstance(event, Token):
                codes = event.stage(stage)
                value = codes.value(feature)
                bar = "#" * min(40, round(abs(value) * 4))
                print(f"{event.position:>4} {event.text!r:<16} {value:+8.3f} {bar:<40} err {codes.error_norm:.3g}")
            elif isinstance(event, Finished):
                print(f"\n{event.reason}: {args.prompt}{event.text}")


if __name__ == "__main__":
    main()
