"""Stop generating the moment a feature fires: a server-side condition ends the branch with a reason.

    python examples/stop_on_feature.py --target localhost:50051 --stage blocks.6.hook_resid_post --feature 77 \
        --threshold 2.0

It generates once freely (with the features of each generated token), then again with a STOP condition.
Without --stage/--feature it stops on the strongest feature of the middle generated token, at half its
value there, so the second run ends early. Uses only the featurewire client library.
"""

from __future__ import annotations

import argparse

from featurewire import Client, Condition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--stage")
    parser.add_argument("--feature", type=int)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    with Client(args.target) as client:
        stage = args.stage or client.info().stack().stages[0].name
        free = client.generate_text(args.prompt, decompose=[stage], max_new_tokens=args.max_new_tokens, seed=0)
        feature, threshold = args.feature, args.threshold
        if feature is None:
            feature, value = free.tokens[len(free.tokens) // 2].stage(stage).top(1)[0]
            threshold = value / 2

        stop = Condition.above(stage, feature, threshold).stop()
        stopped = client.generate_text(args.prompt, conditions=[stop], max_new_tokens=args.max_new_tokens, seed=0)
        print(f"stop when feature {feature} of {stage} > {threshold:.3g}\n")
        print(f"free:      {args.prompt}{free.text}")
        print(f"with stop: {args.prompt}{stopped.text}\n")
        trigger = stopped.finished.trigger
        if trigger is not None:
            print(f"{stopped.finished.reason}: fired at position {trigger.position} with value {trigger.value:+.3f}")
        else:
            print(f"{stopped.finished.reason}: the feature never crossed the threshold")


if __name__ == "__main__":
    main()
