"""The trunk as a plan: the ordered block applications the model walks, made from the config.

Each application says which physical block runs (repeats share its weights), whether its output
is pushed onto the U-Net skip stack (encoder) or whether it pops a skip first and from which slot
(decoder), and whether it runs as a two-lane block (both lanes written) or a sequential one.

    order     0..L-1; with depth recurrence on (FRONTIER.md: NUM_LOOPS extra passes over
              LOOP_START..LOOP_END, once the loop is switched on): 0,1,2,[3,4,5]x3,6..10 = 17
    encoder   the first len(order) // 2 applications; each pushes its output
    decoder   the rest; application j (0-based) pops the stack (LIFO) while j < the number of skip
              slots and the stack is not empty, and mixes it with skip weights (and gates) [j]
    slots     K = min(|encoder|, |decoder|) of the looped order (the plain one without recurrence):
              the weights are sized for the larger topology and the plain order uses the first ones
    lanes     decoder applications of physical blocks >= PARALLEL_START_LAYER run two lanes; they
              must be the last applications (lanes never merge back before the head)

SPEC.md's trunk is the plain order with 5 encoder and 6 decoder blocks and 5 slots.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Application:
    block: int  # the physical block that runs
    push: bool  # encoder: push the output onto the skip stack
    skip_slot: int | None  # decoder: pop a skip first and mix it in with weights (and gates) [skip_slot]
    two_lanes: bool  # a two-lane block writing (L0, L1); else a sequential block writing x (lane 0)


def block_order(cfg, looping: bool) -> list[int]:
    """Physical block of each application, in order."""
    layers = list(range(cfg.num_layers))
    if not (looping and cfg.num_loops):
        return layers
    span = layers[cfg.loop_start : cfg.loop_end + 1]
    return layers[: cfg.loop_start] + span * (cfg.num_loops + 1) + layers[cfg.loop_end + 1 :]


def num_skip_slots(cfg) -> int:
    """K = min(|encoder|, |decoder|) of the looped order (the plain one without recurrence)."""
    applications = len(block_order(cfg, looping=True))
    return min(applications // 2, applications - applications // 2)


def build_plan(cfg, looping: bool) -> tuple[Application, ...]:
    order = block_order(cfg, looping)
    encoder = len(order) // 2
    pops = min(num_skip_slots(cfg), encoder)  # the stack holds `encoder` skips
    plan = []
    for n, block in enumerate(order):
        j = n - encoder  # decoder index (negative in the encoder)
        plan.append(Application(
            block=block,
            push=j < 0,
            skip_slot=j if 0 <= j < pops else None,
            two_lanes=j >= 0 and 0 < cfg.parallel_start_layer <= block,
        ))
    return tuple(plan)


def plan_problems(cfg) -> list[str]:
    """Why the config's trunk cannot be walked (one line each), in both loop states."""
    if not cfg.parallel_start_layer:
        return []
    for looping in (False, True):
        plan = build_plan(cfg, looping)
        lanes = [app.two_lanes for app in plan]
        first = lanes.index(True) if True in lanes else len(plan)
        late_blocks = [app.block for app in plan if app.block >= cfg.parallel_start_layer]
        if not all(lanes[first:]) or len(late_blocks) != len(plan) - first:
            order = [app.block for app in plan]
            return [f"PARALLEL_START_LAYER={cfg.parallel_start_layer}: the two-lane blocks must be the last "
                    f"decoder applications, but the {'looped' if looping else 'plain'} order is {order} with "
                    f"{len(order) // 2} encoder applications; raise it above LOOP_END and NUM_LAYERS // 2"]
    return []
