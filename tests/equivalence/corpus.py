"""The suite's corpus: a few kilobytes of plain English held here, written to a temp folder as
one .txt file per document, so the fixtures never depend on files a clean machine may lack."""

from __future__ import annotations

from pathlib import Path

DOCUMENTS = {
    "harbour.txt": """\
The harbour was quiet in the early morning. Small boats rocked against the stone wall, and the
gulls walked along the edge of the water looking for scraps. An old man in a blue coat sat on a
crate and mended a net, pulling the cord through each broken square with slow, careful hands.
When the bell of the church rang six, the first fishermen came down the hill with their baskets.
They spoke little at that hour. Each knew his own boat and his own work, and the sea would tell
them soon enough what kind of day it meant to be. By seven the boats were gone, and only the
old man remained, still mending, while the tide came in and lifted the weed from the rocks.
In the afternoon the boats returned with cod, mackerel and a few crabs, and the market stalls
filled with buyers who argued about the price of fish as they had done for a hundred years.
""",
    "garden.txt": """\
A garden needs patience more than money. In the spring you turn the soil, pull out the roots
of last year's weeds and add a layer of compost that has rotted over the winter. Seeds go in
when the ground is warm enough to hold a hand against it without feeling the cold. Beans and
peas like to climb, so give them sticks or a net; carrots and onions prefer loose, sandy earth.
Water in the evening, not at noon, because the sun will take the water before the plants can
drink it. Slugs are the great enemy of lettuce, and a saucer of beer set into the soil will
catch more of them than any poison. By midsummer the beds are full, and the work changes from
planting to picking. Tomatoes ripen one by one, the courgettes grow faster than anyone can eat
them, and the neighbours begin to find bags of vegetables left quietly on their doorsteps.
""",
    "science.txt": """\
A neural network is built from layers of simple units. Each unit adds up its inputs, each
multiplied by a weight, and passes the sum through a function that bends it. Training changes
the weights a little at a time so that the network's answers move closer to the right ones.
A language model is trained to predict the next word of a text, and to do this well it must
learn grammar, facts about the world and something of how people reason. Researchers who want
to understand such a model look inside it: they record the activations of its layers on many
texts and search for directions that stand for ideas. A sparse autoencoder is one tool for
this search. It rewrites each activation as the sum of a few features chosen from a large
dictionary, and each feature, if the method works, means one thing that a person can name.
""",
    "letters.txt": """\
Dear Anna, thank you for your letter, which arrived on Tuesday with the rain. We are all well
here, though the roof of the barn has started to leak again and your father spends his evenings
on a ladder with a hammer and a great deal of bad language. The apple trees have done better
than ever this year. We have filled every box in the house and still the branches are heavy.
Your brother writes that the city is loud and expensive but that he likes his work at the
library, where he sorts old maps and newspapers that nobody has opened in fifty years. He says
he found a map of our valley drawn before the railway came, with the mill and the ford marked
in red ink. Come home for the harvest if you can. The kitchen is warm, the bread is fresh, and
there is always a bed for you under the window that looks out on the hills. With love, Mother.
""",
    "numbers.txt": """\
The train leaves the station at 8:15 and arrives in the capital at 11:40, a journey of three
hours and twenty-five minutes. A return ticket costs 42 pounds, or 30 with a railcard. On the
way the line crosses two rivers and passes through a tunnel 1,200 metres long. In 1998 the
company counted 2,500 passengers a day; by 2024 the number had grown to 9,000, and the trains
were often so full that people stood in the corridors for the whole trip. The plan is to add
four new carriages to every train next year and to run a service every 30 minutes instead of
every hour. Engineers estimate that the work will take 18 months and cost 64 million pounds,
of which half will come from the government and half from higher fares over ten years.
""",
}


def write_corpus(folder: Path) -> Path:
    """The documents as .txt files in `folder` (created); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder
