"""The inference engine: one worker thread, the scheduler and batches, generation, decompose,
interventions, served stacks, request specs and validation. Imports `core`, never grpc.
"""
