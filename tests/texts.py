"""Prompts and concepts shared by the engine tests (chosen for their token lengths)."""

SHORT = "Give three tips for staying healthy."
MID = (
    "Describe the water cycle in simple terms for a child who has never heard of evaporation, "
    "condensation or precipitation, and explain why rain falls from clouds."
)
LONG = (
    "You are helping a small town library plan its summer reading program. The library has a limited "
    "budget, two part-time staff members and a large group of volunteers who are mostly retired teachers. "
    "Children between six and twelve years old should be encouraged to read at least ten books over the "
    "summer, while teenagers need activities that feel less like school and more like a club. Write a "
    "plan that lists the weekly events, explains how progress will be tracked, and suggests three cheap "
    "prizes that would motivate young readers to finish the program."
)
# Far more than 64 tokens: exercises the concept_max_len truncation.
LONG_CONCEPT = (
    "a quiet mountain village in winter, where the snow covers every roof and the people gather in the old "
    "wooden hall to share warm bread, tell stories about the summer, sing songs about the rivers and the "
    "forests, and wait for the spring to return to the valley below the high and silent peaks, while the "
    "children build snowmen and the dogs sleep near the fire"
)
