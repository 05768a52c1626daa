"""Steer a generation by pinning one SAE feature, next to the unsteered continuation from the same call.

    python examples/steer.py --target localhost:50051 --stage blocks.6.hook_resid_post --feature 123 --value 8

Without --stage/--feature it steers with the strongest feature of a concept text. The edit is
error-preserving (only the feature moves; the SAE's reconstruction error stays in the activation), and
the same seed drives both branches, so the difference is the edit's. Uses only the featurewire client.
"""

from __future__ import annotations

import argparse

from featurewire import Client, Intervention, Positions


def concept_feature(client: Client, text: str, stage: str) -> int:
    """The feature with the largest total |value| over a concept text (BOS skipped)."""
    totals: dict[int, float] = {}
    for token in list(client.decompose(text, stages=stage, top_k=8, include_error=False))[1:]:
        for feature, value in token.stage(stage).top(8):
            totals[feature] = totals.get(feature, 0.0) + abs(value)
    return max(totals, key=totals.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--prompt", default="My favourite food is")
    parser.add_argument("--concept", default="We celebrated the wedding with love, joy and happiness.")
    parser.add_argument("--stage")
    parser.add_argument("--feature", type=int)
    parser.add_argument("--value", type=float, default=8.0, help="the value the feature is pinned to")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    with Client(args.target) as client:
        stage = args.stage or client.info().stack().stages[-1].name
        feature = args.feature if args.feature is not None else concept_feature(client, args.concept, stage)
        edit = Intervention.set(stage, feature, args.value, positions=Positions.generated())
        result = client.generate_text(args.prompt, interventions=[edit], with_default=True,
                                      max_new_tokens=args.max_new_tokens, seed=0)
        score = client.score(args.prompt + result.default_text, interventions=[edit.at("all")])
        print(f"feature {feature} of {stage} pinned to {args.value:g} on generated tokens (seed {result.seed})\n")
        print(f"steered: {args.prompt}{result.text}")
        print(f"default: {args.prompt}{result.default_text}")
        print(f"\nthe same edit on the default text: CE {score.clean_ce:.3f} -> {score.edited_ce:.3f} nats/token, "
              f"KL {score.kl:.3f}")


if __name__ == "__main__":
    main()
