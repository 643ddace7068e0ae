"""A built-in corpus of simple children's stories, generated offline and deterministically.

Every story is built from a hero (a child or an animal, with a trait), a friend, a grown-up, a place,
a treasured object, the weather and one of many plots (a lost toy, a fear faced, a mistake owned up
to, a race, a garden, a storm...). Each sentence is picked from several phrasings and filled in from
the story's cast, so a small model can learn the structure (openings, dialogue in quotes, a turn, a
resolution, a moral) but cannot memorize a handful of stories: the number of distinct stories is
astronomically larger than any corpus you would ask for.

Story i of split s is a pure function of (seed, split, i), so any prefix of the corpus is stable and
the train and val streams never share a random stream.

    from nanomoe.data.builtin_corpus import generate_stories
    for story in generate_stories(seed=0, size_bytes=1_000_000): ...
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

GENERATOR_VERSION = 2  # bump whenever the output changes, so cached corpora are rebuilt

# ---------------------------------------------------------------------------------------------
# Cast

GIRL_NAMES = [
    "Lily", "Mia", "Emma", "Sophie", "Lucy", "Anna", "Zoe", "Ella", "Ruby", "Grace", "Chloe", "Maya",
    "Nora", "Ivy", "Rosa", "Amara", "Hana", "Leila", "Priya", "Sara", "Ava", "Olivia", "Isla", "Luna",
    "Clara", "Daisy", "Tia", "Nina", "Freya", "Aisha", "Mei", "Elsa", "Juno", "Poppy", "Kira", "Bea",
]
BOY_NAMES = [
    "Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Noah", "Liam", "Oscar", "Theo", "Omar",
    "Ravi", "Kai", "Eli", "Hugo", "Milo", "Jonah", "Arlo", "Felix", "Tim", "Luca", "Ezra", "Ali",
    "Jamal", "Ken", "Otis", "Rory", "Sid", "Toby", "Ned", "Ivan", "Pablo", "Dev", "Jude", "Rex",
]
PET_NAMES = [
    "Pip", "Bubbles", "Coco", "Patch", "Buttons", "Biscuit", "Pepper", "Sunny", "Misty", "Rusty",
    "Hazel", "Puddle", "Twig", "Pebble", "Bramble", "Maple", "Clover", "Nutmeg", "Scout", "Dot",
    "Fuzzy", "Whiskers", "Peanut", "Honey", "Ziggy", "Bolt", "Socks", "Toffee", "Ollie", "Mochi",
]
ANIMALS = [
    # (noun, adjectives that suit it, a sound or move it makes)
    ("puppy", ["little", "fluffy", "brown", "spotted", "playful"], "wagged its tail"),
    ("kitten", ["small", "gray", "striped", "soft", "curious"], "purred softly"),
    ("bunny", ["little", "white", "fluffy", "quick", "tiny"], "twitched its nose"),
    ("bear cub", ["little", "brown", "round", "sleepy", "big"], "gave a happy growl"),
    ("duck", ["little", "yellow", "small", "noisy", "tiny"], "flapped its wings"),
    ("mouse", ["tiny", "gray", "quiet", "quick", "little"], "squeaked"),
    ("fox", ["little", "red", "clever", "quick", "young"], "swished its tail"),
    ("owl", ["small", "wise", "brown", "sleepy", "little"], "hooted"),
    ("turtle", ["slow", "green", "little", "old", "small"], "poked out its head"),
    ("frog", ["green", "little", "jumpy", "small", "shiny"], "said ribbit"),
    ("pig", ["pink", "little", "muddy", "round", "happy"], "gave a little oink"),
    ("lamb", ["white", "woolly", "little", "soft", "small"], "said baa"),
    ("squirrel", ["busy", "brown", "little", "quick", "fluffy"], "flicked its tail"),
    ("elephant", ["big", "gray", "gentle", "young", "kind"], "lifted its trunk"),
    ("penguin", ["little", "black and white", "small", "wobbly", "happy"], "waddled in a circle"),
    ("dragon", ["small", "green", "friendly", "little", "shy"], "puffed a tiny cloud of smoke"),
    ("robot", ["little", "shiny", "silver", "small", "funny"], "beeped twice"),
    ("monkey", ["little", "brown", "silly", "small", "quick"], "swung from a branch"),
    ("hedgehog", ["tiny", "prickly", "little", "brown", "shy"], "curled into a ball"),
    ("pony", ["little", "brown", "spotted", "gentle", "young"], "stamped its hoof"),
    ("goat", ["little", "white", "jumpy", "silly", "young"], "bleated"),
    ("bird", ["little", "blue", "small", "bright", "tiny"], "sang a sweet song"),
    ("dinosaur", ["little", "green", "friendly", "big", "young"], "stomped its feet"),
    ("cow", ["big", "brown", "gentle", "spotted", "calm"], "said moo"),
]
TRAITS = [
    "kind", "curious", "shy", "brave", "happy", "silly", "clever", "careful", "busy", "cheerful",
    "gentle", "playful", "friendly", "helpful", "quiet", "bold", "funny", "sleepy", "proud", "polite",
]
LIKES = [
    "to play outside", "to sing songs", "to draw pictures", "to read books", "to run fast", "to dance",
    "to build things", "to help others", "to look at the stars", "to splash in puddles", "to climb trees",
    "to ask questions", "to collect shiny stones", "to bake with {parent}", "to play hide and seek",
    "to watch the birds", "to make up stories", "to jump in the leaves", "to swim", "to paint",
]
GROWNUPS = [("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"), ("Aunt May", "she"),
            ("Uncle Joe", "he"), ("Nana", "she"), ("Papa", "he")]
TEACHERS = [("Miss Rose", "she"), ("Mr. Brown", "he"), ("Mrs. Green", "she"), ("Mr. Lee", "he")]

PRONOUNS = {
    "she": dict(he="she", him="her", his="her", hers="hers", himself="herself"),
    "he": dict(he="he", him="him", his="his", hers="his", himself="himself"),
    "it": dict(he="it", him="it", his="its", hers="its", himself="itself"),
}


@dataclass
class Character:
    name: str
    kind: str  # "girl", "boy", "puppy", ...
    adjective: str
    pronoun: str  # "she" | "he"
    trait: str
    move: str  # a thing this character does when happy

    def intro(self) -> str:
        return f"{article(self.adjective)} {self.adjective} {self.kind} named {self.name}"


def make_character(rng: random.Random, avoid: set[str]) -> Character:
    trait = rng.choice(TRAITS)
    if rng.random() < 0.55:
        pronoun = rng.choice(["she", "he"])
        names = GIRL_NAMES if pronoun == "she" else BOY_NAMES
        kind = "girl" if pronoun == "she" else "boy"
        adjective = rng.choice(["little", "young", "small", trait])
        move = rng.choice(["clapped her hands", "jumped up and down", "smiled a big smile", "laughed"])
        if pronoun == "he":
            move = move.replace("her", "his")
    else:
        pronoun = rng.choice(["she", "he"])
        names = PET_NAMES
        kind, adjectives, move = rng.choice(ANIMALS)
        adjective = rng.choice(adjectives)
        move = move.replace("its", "her" if pronoun == "she" else "his")
    name = rng.choice([n for n in names if n not in avoid])
    return Character(name, kind, adjective, pronoun, trait, move)


# ---------------------------------------------------------------------------------------------
# World


@dataclass(frozen=True)
class Place:
    name: str  # "the park"
    at: str  # "at the park"
    spots: tuple[str, ...]  # where things get lost and found
    sights: tuple[str, ...]  # what you see there
    fun: tuple[str, ...]  # what you do there (verb phrases)
    outdoor: bool = True


PLACES = [
    Place("the park", "at the park", ("under the slide", "behind a big tree", "near the swings", "in the sandbox"),
          ("children on the swings", "a dog chasing a ball", "ducks on the pond"),
          ("play on the swings", "run on the grass", "go down the slide")),
    Place("the forest", "in the forest", ("under a pile of leaves", "behind a mossy log", "near a tall pine tree",
                                          "inside a hollow stump"),
          ("tall green trees", "a deer far away", "mushrooms by the path"),
          ("look for pinecones", "follow the little path", "listen to the birds")),
    Place("the beach", "at the beach", ("under the warm sand", "behind a big rock", "near the water",
                                        "inside a bucket"),
          ("waves rolling in", "seagulls in the sky", "shells on the sand"),
          ("build sandcastles", "splash in the waves", "look for shells")),
    Place("the garden", "in the garden", ("under a big leaf", "behind the flower pots", "near the fence",
                                          "in the watering can"),
          ("red and yellow flowers", "a busy bee", "a fat worm in the dirt"),
          ("water the flowers", "dig in the dirt", "pick strawberries")),
    Place("the farm", "on the farm", ("in the hay", "behind the red barn", "near the chicken coop",
                                      "under the tractor"),
          ("cows in the field", "chickens pecking at seeds", "a big red barn"),
          ("feed the chickens", "ride on the tractor", "collect eggs")),
    Place("school", "at school", ("under a desk", "in the toy box", "behind the bookshelf", "in a coat pocket"),
          ("children painting pictures", "a big map on the wall", "a fish tank"),
          ("paint pictures", "sing songs", "play with blocks"), outdoor=False),
    Place("the library", "at the library", ("between two big books", "under a reading chair",
                                            "behind the desk", "on a high shelf"),
          ("rows and rows of books", "a cozy reading corner", "a sleepy cat on a chair"),
          ("read picture books", "listen to a story", "look at books about animals"), outdoor=False),
    Place("the pond", "by the pond", ("under a lily pad", "in the tall grass", "behind a wet rock",
                                      "near the little bridge"),
          ("frogs on lily pads", "fish in the water", "dragonflies over the water"),
          ("throw pebbles in the water", "watch the ducks", "catch tadpoles in a jar")),
    Place("the meadow", "in the meadow", ("in the tall grass", "under a daisy bush", "near a big stone",
                                          "behind a hill"),
          ("butterflies everywhere", "wild flowers", "a rabbit hopping by"),
          ("chase butterflies", "pick flowers", "roll down the hill")),
    Place("the snowy hill", "on the snowy hill", ("under the snow", "behind a snowman", "near the sled tracks",
                                                  "by a frozen bush"),
          ("white snow everywhere", "kids on sleds", "a snowman with a carrot nose"),
          ("ride a sled", "make snow angels", "throw snowballs")),
    Place("the kitchen", "in the kitchen", ("under the table", "behind the cookie jar", "in a drawer",
                                            "next to the oven"),
          ("a bowl of apples", "a warm oven", "flour on the table"),
          ("bake cookies", "make a cake", "wash the cups"), outdoor=False),
    Place("the playground", "at the playground", ("under the seesaw", "behind the climbing frame",
                                                  "in the sandpit", "near the gate"),
          ("kids on the seesaw", "a tall climbing frame", "a bright red slide"),
          ("play tag", "climb the climbing frame", "ride the seesaw")),
    Place("the zoo", "at the zoo", ("near the monkey house", "under a bench", "by the lion's fence",
                                    "behind a map stand"),
          ("a tall giraffe", "monkeys swinging", "a sleepy lion"),
          ("see the animals", "feed the goats", "watch the penguins swim")),
    Place("the market", "at the market", ("under a fruit stand", "behind a basket of apples",
                                          "near the flower stall", "between two boxes"),
          ("piles of fruit", "people buying bread", "bright flowers for sale"),
          ("buy apples", "smell the fresh bread", "help carry the bags")),
    Place("the river", "by the river", ("under the old bridge", "behind some reeds", "near a fallen tree",
                                        "between two smooth stones"),
          ("the water rushing by", "a heron standing still", "a little wooden boat"),
          ("skip stones", "sail paper boats", "dip their toes in the water")),
    Place("the backyard", "in the backyard", ("under the porch", "behind the shed", "in the doghouse",
                                              "near the fence"),
          ("the old swing", "a bird feeder", "green grass"),
          ("play catch", "swing on the old swing", "have a picnic")),
]

OBJECTS = [
    # (noun, adjectives)
    ("ball", ["red", "bouncy", "blue", "striped"]),
    ("kite", ["red", "big", "rainbow", "yellow"]),
    ("teddy bear", ["soft", "brown", "old", "fluffy"]),
    ("hat", ["red", "blue", "funny", "warm"]),
    ("toy car", ["little", "red", "fast", "shiny"]),
    ("toy boat", ["little", "wooden", "blue", "white"]),
    ("book", ["big", "old", "picture", "favorite"]),
    ("box of crayons", ["new", "big", "colorful", "little"]),
    ("doll", ["pretty", "old", "little", "soft"]),
    ("drum", ["little", "loud", "red", "toy"]),
    ("scarf", ["warm", "green", "long", "woolly"]),
    ("shell", ["pink", "shiny", "pretty", "big"]),
    ("stone", ["shiny", "smooth", "round", "sparkly"]),
    ("key", ["golden", "little", "old", "shiny"]),
    ("balloon", ["red", "big", "yellow", "purple"]),
    ("blanket", ["soft", "warm", "blue", "old"]),
    ("puzzle", ["big", "new", "hard", "colorful"]),
    ("whistle", ["shiny", "little", "silver", "loud"]),
    ("map", ["old", "paper", "funny", "secret"]),
    ("cup", ["blue", "little", "special", "pink"]),
    ("spoon", ["silver", "big", "wooden", "little"]),
    ("sock", ["striped", "warm", "green", "odd"]),
    ("bell", ["little", "golden", "shiny", "silver"]),
    ("basket", ["little", "woven", "brown", "big"]),
    ("flower", ["pretty", "yellow", "red", "tiny"]),
    ("rope", ["long", "strong", "yellow", "old"]),
    ("jar", ["glass", "little", "empty", "big"]),
    ("train", ["toy", "little", "red", "wooden"]),
    ("bike", ["red", "new", "blue", "little"]),
    ("umbrella", ["yellow", "big", "spotted", "green"]),
]
TREATS = ["cookies", "apples", "cherries", "grapes", "crackers", "sweets", "cupcakes", "berries", "carrots",
          "sandwiches", "muffins", "bananas", "strawberries", "pancakes"]
WEATHER = [
    ("sunny", "The sun was warm and bright."),
    ("windy", "The wind was blowing hard and the trees were dancing."),
    ("cloudy", "Big gray clouds covered the sky."),
    ("snowy", "Soft white snow was falling."),
    ("rainy", "Rain was falling pitter patter on the roof."),
    ("warm", "The air was warm and the birds were singing."),
    ("cold", "The air was cold and crisp."),
]
TIMES = ["One day", "One morning", "One sunny afternoon", "One evening", "One bright morning", "One Saturday",
         "One fine day", "One spring day", "On a quiet Sunday", "After breakfast one day"]

# ---------------------------------------------------------------------------------------------
# Helpers


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Cast(dict):
    """Template fields; `{Name}` is `{name}` capitalized (for the start of a sentence)."""

    def __missing__(self, key: str) -> str:
        lower = key[:1].lower() + key[1:]
        if lower != key and lower in self:
            return cap(self[lower])
        raise KeyError(key)


class Story:
    """Collects sentences into paragraphs; formats templates with the story's cast."""

    def __init__(self, rng: random.Random, ctx: dict[str, str]) -> None:
        self.rng = rng
        self.ctx = _Cast(ctx)
        self.paragraphs: list[list[str]] = [[]]
        self.friend_known = False

    def fill(self, template: str) -> str:
        # remember who has been mentioned, so the ending only talks about characters the reader knows
        if "{fname}" in template or "{Fname}" in template:
            self.friend_known = True
        return cap(template.format_map(self.ctx))

    def go_outside(self) -> None:
        """For plots that need the outdoors: move the story to an outdoor place if it is indoors."""
        if not self.ctx["outdoor"]:
            set_place(self.ctx, self.rng, self.rng.choice([p for p in PLACES if p.outdoor]))

    def say(self, *templates: str) -> None:
        """Add one sentence, picked among `templates`."""
        self.paragraphs[-1].append(self.fill(self.rng.choice(templates)))

    def maybe(self, p: float, *templates: str) -> None:
        if self.rng.random() < p:
            self.say(*templates)

    def quote(self, speaker: str, lines: list[str], verbs: tuple[str, ...] = ("said",)) -> None:
        """Dialogue on its own line: `Name said, "..."` or `"...," said Name.`"""
        line = self.fill(self.rng.choice(lines))
        verb = self.rng.choice(verbs)
        if verb == "asked" and not line.endswith("?"):
            verb = "said"
        speaker = self.fill(speaker)
        if self.rng.random() < 0.5 or line[-1] in "?!":
            text = f'{speaker} {verb}, "{line}"'
        else:
            # "...," said Mom.  /  "...," Mom said gently.
            said = f"{verb} {speaker}" if " " not in verb else f"{speaker} {verb}"
            text = f'"{line[:-1]}," {said}.' if line.endswith(".") else f'{speaker} {verb}, "{line}"'
        self.new_paragraph()
        self.paragraphs[-1].append(text)
        self.new_paragraph()

    def new_paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def text(self) -> str:
        return "\n".join(" ".join(p) for p in self.paragraphs if p)


def set_place(ctx: dict[str, str], rng: random.Random, place: Place) -> None:
    spot, spot2 = rng.sample(place.spots, 2)
    fun, fun2 = rng.sample(place.fun, 2)
    ctx.update(place=place.name, at=place.at, spot=spot, spot2=spot2, sight=rng.choice(place.sights), fun=fun,
               fun2=fun2, outdoor="yes" if place.outdoor else "")
    snowy = place.name == "the snowy hill"
    # keep the weather possible: snow only on the snowy hill, and it is never warm there
    weather = [w for w in WEATHER if (w[0] in ("snowy", "cold")) == snowy or (not snowy and w[0] == "cold")]
    ctx["weather"], ctx["weather_line"] = rng.choice(weather)


def _cast(rng: random.Random) -> dict[str, str]:
    hero = make_character(rng, set())
    friend = make_character(rng, {hero.name})
    grownup, grownup_he = rng.choice(GROWNUPS)
    teacher, teacher_he = rng.choice(TEACHERS)
    obj, obj_adjs = rng.choice(OBJECTS)
    obj_adj = rng.choice(obj_adjs)
    ctx: dict[str, str] = dict(
        name=hero.name, kind=hero.kind, intro=hero.intro(), trait=hero.trait, move=hero.move,
        fname=friend.name, fkind=friend.kind, fintro=friend.intro(), ftrait=friend.trait, fmove=friend.move,
        parent=grownup, teacher=teacher,
        obj=f"{obj_adj} {obj}", thing=obj, a_obj=f"{article(obj_adj)} {obj_adj} {obj}",
        treat=rng.choice(TREATS), time=rng.choice(TIMES),
    )
    set_place(ctx, rng, rng.choice(PLACES))
    ctx["likes"] = rng.choice(LIKES).format(parent=grownup)
    for prefix, pronoun in (("", hero.pronoun), ("f", friend.pronoun), ("p", grownup_he), ("t", teacher_he)):
        for key, word in PRONOUNS[pronoun].items():
            ctx[prefix + key] = word
    return ctx


# ---------------------------------------------------------------------------------------------
# Story parts shared by the plots


def opening(s: Story) -> None:
    s.say(
        "Once upon a time, there was {intro}.",
        "Once upon a time, {intro} lived in a little house near {place}.",
        "There once was {intro}.",
        "{time}, {intro} woke up early.",
        "In a small town, there lived {intro}.",
        "Long ago, in a land full of green hills, there lived {intro}.",
    )
    if s.rng.random() < 0.5:
        s.say("{He} was {trait} and liked {likes}.", "{He} was very {trait}, and {he} loved {likes}.")
    else:
        s.maybe(0.6, "{He} was very {trait}.", "Everyone knew {name} was {trait}.", "{Name} was always {trait}.")
        s.maybe(0.6, "{Name} loved {likes}.", "More than anything, {name} liked {likes}.")


def set_scene(s: Story) -> None:
    s.say(
        "{time}, {name} went to {place} with {parent}.",
        "{time}, {name} and {parent} went to {place}.",
        "{time}, {name} walked to {place}.",
        "{time}, {name} decided to go to {place}.",
    )
    s.maybe(0.6, "{weather_line}", "It was a {weather} day.", "The day was {weather}.")
    s.maybe(0.5, "{He} saw {sight}.", "{Name} looked around and saw {sight}.")


def meet_friend(s: Story) -> None:
    s.say(
        "There {name} met {fintro}.",
        "Soon {name} saw {fintro}.",
        "{Name} met {fintro} {at}.",
        "Along the way, {name} met {fintro}.",
    )


def happy_end(s: Story) -> None:
    s.new_paragraph()
    endings = [
        "{Name} felt happy and warm inside.",
        "{Name} smiled and {move}.",
        "{Name} was so happy that {he} {move}.",
        "That night, {name} went to bed with a big smile.",
        "It was the best day ever.",
        "{Name} hugged {parent} tight.",
    ]
    if s.friend_known:
        endings += ["{Name} and {fname} laughed together.", "{Name} and {fname} went home happy."]
    s.say(*endings)


def moral(s: Story, morals: list[str], from_then: list[str]) -> None:
    """End with a stated moral, a "from that day on", a plain "The end." or nothing."""
    if s.friend_known:
        from_then = from_then + ["{name} and {fname} were best friends."]
    roll = s.rng.random()
    if roll < 0.45:
        lesson = s.rng.choice(morals)
        s.say("The moral of the story is: " + lesson, "{Name} learned an important lesson: " + lesson,
              "And so {name} learned: " + lesson)
    elif roll < 0.75:
        later = s.rng.choice(from_then)
        s.say("From that day on, " + later, "And from then on, " + later, "After that day, " + later)
    elif roll < 0.85:
        s.say("The end.")


# ---------------------------------------------------------------------------------------------
# Plots: each writes the middle and end of a story


def plot_lost(s: Story) -> None:
    s.say("{Name} had {a_obj}.", "{Name} had a favorite toy. It was {a_obj}.", "{Parent} had given {name} {a_obj}.")
    s.maybe(0.6, "{He} took it everywhere.", "{He} loved it very much.", "It was {his} favorite thing in the world.")
    set_scene(s)
    s.say("{Name} played with the {thing} all morning.", "{Name} wanted to {fun} with the {thing}.")
    s.say("But when {he} looked down, the {thing} was gone!", "Then {name} put the {thing} down to {fun}.",
          "Suddenly, {name} could not find the {thing}.")
    s.maybe(0.6, "{Name} felt sad and worried.", "{Name}'s eyes filled with tears.", "{His} heart went thump, thump.")
    s.quote("{name}", ["Where is my {thing}?", "Oh no! I lost my {thing}!", "My {thing} is gone!",
                       "Has anyone seen my {obj}?"], ("cried", "said", "shouted"))
    meet_friend(s)
    s.quote("{fname}", ["Don't worry, I will help you look.", "I can help you find it!", "Let's look together.",
                        "Two friends can look better than one."], ("said", "said kindly", "smiled"))
    s.say("They looked {spot}, but it was not there.", "First they looked {spot}. Nothing was there.")
    s.say("Then they looked {spot2}.", "Next, {fname} had an idea and looked {spot2}.", "They looked {spot2} too.")
    if s.rng.random() < 0.5:
        s.say("And there it was! The {obj}!", "There was the {thing}, safe and sound!", "{Fname} found it!")
    else:
        s.say("Then they saw a little dog with something in its mouth. It was the {thing}!",
              "A bird was sitting next to something bright. It was the {thing}!")
        s.say("The dog dropped the {thing} and ran away.", "{Name} laughed and picked it up.")
    s.quote("{name}", ["Thank you, {fname}! You are a good friend.", "Thank you for helping me!",
                       "Yay! My {thing}! Thank you!"], ("said", "cheered", "shouted"))
    happy_end(s)
    moral(s, ["Friends help each other.", "It is good to ask for help.", "Take good care of the things you love.",
              "Never give up when you look for something."],
              ["{name} took good care of {his} {thing}.", "{name} always helped friends look for lost things."])


def plot_sharing(s: Story) -> None:
    set_scene(s)
    s.say("{Name} had a bag of {treat}.", "{Parent} gave {name} some {treat}.", "{Name} had {a_obj} and some {treat}.")
    meet_friend(s)
    s.say("{Fname} looked at the {treat} and felt hungry.", "{Fname} looked sad because {fhe} had no {treat}.",
          "{Fname} had nothing to eat.")
    s.quote("{fname}", ["Can I have some {treat}, please?", "Those {treat} look yummy. Can I have one?",
                        "May I try one?"], ("asked", "said quietly"))
    if s.rng.random() < 0.5:
        s.quote("{name}", ["No! They are all mine.", "No, I want them all.", "These are mine!"], ("said", "shouted"))
        s.say("{Fname} walked away and sat alone.", "{Fname} looked down at {fhis} feet.")
        s.say("{Name} ate some {treat}, but they did not taste so good anymore.",
              "{Name} felt a funny, heavy feeling in {his} tummy.",
              "{Name} did not feel happy at all.")
        s.say("{He} thought about {fname}.", "{Name} remembered what {parent} always said about sharing.")
        s.quote("{name}", ["I am sorry, {fname}. Let's share.", "Here, {fname}. Half for you and half for me.",
                           "I was not kind. Please have some."], ("said", "said softly"))
    else:
        s.quote("{name}", ["Of course! Let's share.", "Yes! Here, take some.", "Sure, we can share them."],
                ("said", "said with a smile"))
    s.say("{Fname} smiled a big smile.", "{Fname} {fmove}.", "{Fname}'s face lit up.")
    s.say("They ate the {treat} together and then went to {fun} together.",
          "The two friends sat down and shared the {treat}.")
    happy_end(s)
    moral(s, ["Sharing makes everyone happy.", "It is nice to share.", "When you share, you get a friend.",
              "Kindness is the best treat."],
              ["{name} always shared with {his} friends.", "{name} never ate {treat} alone again."])


def plot_new_friend(s: Story) -> None:
    set_scene(s)
    s.say("{Name} did not know anyone there.", "{Name} felt a little lonely.",
          "All the other children were playing, but {name} was alone.")
    s.say("Then {he} saw {fintro} sitting by {fhimself}.", "{Spot}, {name} saw {fintro}.",
          "{Name} noticed {fintro} who looked lonely too.")
    s.say("{Name} was shy. {He} did not know what to say.", "{Name} took a deep breath.",
          "{Name} wanted to say hello, but {he} felt shy.")
    s.quote("{name}", ["Hello! My name is {name}. What is your name?", "Hi! Do you want to play with me?",
                       "Hello. Can I sit with you?"], ("said",))
    s.quote("{fname}", ["I am {fname}. Yes, let's play!", "My name is {fname}. I would like that!",
                        "Hi, {name}! I was hoping someone would say hello."], ("said", "answered"))
    s.say("They decided to {fun}.", "Together they went to {fun}.", "The two of them played all afternoon.")
    s.maybe(0.6, "{Fname} showed {name} how to {fun2}.", "They laughed so much that their tummies hurt.",
            "They told each other funny stories.")
    s.say("When it was time to go home, they did not want to stop playing.",
          "When the sun went down, they promised to play again tomorrow.")
    happy_end(s)
    moral(s, ["Saying hello can make a new friend.", "Being brave can bring good things.",
              "Everyone needs a friend."],
              ["{name} was never lonely at {place} again.", "{name} always said hello to new children."])


FEARS = [
    ("the dark", "the room was very dark", "turned on a little light and saw that it was only {his} coat on a chair"),
    ("thunder", "a big storm came and the thunder went BOOM", "counted with {parent} and the storm went far away"),
    ("the big slide", "the slide was very tall", "went down the slide and it was fast and fun"),
    ("deep water", "the water looked very deep", "held {parent}'s hand and kicked {his} legs, and {he} could swim"),
    ("the big dog next door", "the dog barked very loudly", "held out {his} hand and the dog licked it gently"),
    ("the tall tree", "the branches were high up", "climbed one branch at a time and saw the whole town"),
    ("the first day of school", "the school looked so big", "met {teacher}, who had a warm smile"),
    ("the noisy vacuum", "the vacuum roared like a monster", "pushed the vacuum and it was only a machine"),
]


def plot_fear(s: Story) -> None:
    fear, scary, brave = s.rng.choice(FEARS)
    s.ctx.update(fear=fear, scary=scary, brave=brave.format_map(s.ctx))
    s.say("But {name} was afraid of {fear}.", "There was one thing {name} did not like: {fear}.",
          "{Name} was scared of {fear}.")
    s.say("{time}, {scary}.", "Then one day, {scary}.")
    s.say("{Name} hid under {his} blanket.", "{Name} wanted to run away.", "{Name}'s knees began to shake.")
    s.quote("{name}", ["I am scared!", "I can't do it!", "{Parent}, help me!", "What if something bad happens?"],
            ("cried", "whispered", "said"))
    s.say("{Parent} came and sat next to {name}.", "{Parent} gave {name} a big hug.",
          "{Fname} came to stand next to {name}.")
    s.quote("{parent}", ["It is okay to be scared. Let's try together.", "You are braver than you think.",
                         "Take a deep breath. I am right here with you.", "Let's be brave together."],
            ("said", "said softly", "said gently"))
    s.say("{Name} took a deep breath.", "{Name} counted to three.", "{Name} held {his} breath.")
    s.say("{Name} {brave}.", "Slowly, {name} {brave}.")
    s.say("It was not scary at all!", "It was not so bad after all.", "{Name} could not believe it.")
    s.quote("{name}", ["I did it! I was brave!", "That was fun! Can we do it again?", "I am not scared anymore!"],
            ("shouted", "said", "laughed"))
    s.say("{Parent} was very proud of {him}.", "{Parent} clapped and cheered.")
    happy_end(s)
    moral(s, ["Being brave means trying even when you are scared.", "Things are often less scary than they look.",
              "It helps to have someone who loves you nearby."],
              ["{name} was not afraid of {fear} anymore.", "{name} was a little braver every day."])


HURT = [
    ("a little bird with a hurt wing", "the bird", "put the bird in a box with soft grass and gave it water",
     "flew up into the sky"),
    ("a kitten stuck high in a tree", "the kitten", "held out a long branch so the kitten could climb down",
     "purred and rubbed against {his} legs"),
    ("a baby duck that had lost its mother", "the duckling", "walked with the duckling along the water",
     "ran to its mother and quacked"),
    ("a puppy with its paw caught in a fence", "the puppy", "gently pulled the fence wire away",
     "licked {his} face"),
    ("a turtle stuck on its back", "the turtle", "carefully turned the turtle over", "walked slowly away"),
    ("a butterfly caught in a spider web", "the butterfly", "freed the butterfly with a little stick",
     "flew around {his} head three times"),
]


def plot_helping(s: Story) -> None:
    s.go_outside()
    set_scene(s)
    hurt, who, help_, thanks = s.rng.choice(HURT)
    s.ctx.update(hurt=hurt, who=who, help=help_, thanks=thanks.format_map(s.ctx))
    s.say("Suddenly, {name} heard a small sound.", "Then {name} saw something {spot}.",
          "As {he} walked, {name} heard a little cry.")
    s.say("It was {hurt}!", "{He} found {hurt}.", "There was {hurt}.")
    s.quote("{name}", ["Oh no! {Who} needs help!", "Poor little thing. I will help you.",
                       "Don't be scared. I am here."],
            ("said", "whispered"))
    if s.rng.random() < 0.5:
        helper = s.rng.choice(["{parent}", "{fname}"])
        s.say("{Name} ran to get " + helper + ".", "{Name} called " + helper + " to help.")
        s.quote(helper, ["Let's help together. Be very gentle.", "You did the right thing to call me."],
                ("said",))
    s.say("{Name} {help}.", "Very gently, {name} {help}.")
    s.say("Soon {who} was safe.", "After a while, {who} felt better.", "{Who} looked at {name} with bright eyes.")
    s.say("Then {who} {thanks}.", "{Who} {thanks}.")
    s.quote("{name}", ["Goodbye, little friend!", "Be safe!", "I am glad you are okay."], ("said", "called", "waved"))
    happy_end(s)
    moral(s, ["Always help those who are small and weak.", "Kindness makes the world better.",
              "A small act of kindness can mean a lot."],
              ["{name} always looked out for animals in need.", "{name} helped whenever {he} could."])


BREAKABLES = [("vase", "broke into pieces"), ("plate", "cracked in two"), ("lamp", "fell and broke"),
              ("cup", "smashed on the floor"), ("picture frame", "cracked"), ("cookie jar", "broke into pieces")]


def plot_mistake(s: Story) -> None:
    thing, broke = s.rng.choice(BREAKABLES)
    s.ctx.update(breakable=thing, broke=broke)
    s.say("{Parent} had a special {breakable}.", "On a shelf in the house there was a pretty {breakable}.")
    s.maybe(0.7, "{Parent} said, \"Please be careful with the {breakable}.\"",
            "{Parent} loved that {breakable} very much.")
    s.say("{time}, {name} was playing with {his} {obj} inside the house.",
          "{time}, {name} was running and jumping in the living room.")
    s.say("Oops! {Name} bumped the shelf and the {breakable} {broke}.",
          "Crash! The {breakable} {broke}.", "{Name} bumped the table. The {breakable} {broke}!")
    s.say("{Name} was scared. {He} hid the pieces {spot}.",
          "{Name} did not want to get in trouble, so {he} hid the pieces.",
          "{Name} ran to {his} room and did not say anything.")
    s.say("{Parent} looked for the {breakable} everywhere.", "Later, {parent} asked, \"Where is my {breakable}?\"")
    s.say("{Name} felt a heavy feeling in {his} tummy.", "{Name} could not eat {his} dinner.",
          "{Name}'s face got red and hot.")
    s.say("{He} knew {he} had to tell the truth.", "{Name} thought about it and made a choice.")
    s.quote("{name}", ["I broke the {breakable}. I am sorry.", "It was me. I broke it by accident. I am very sorry.",
                       "{Parent}, I have to tell you something. I broke your {breakable}."], ("said", "whispered"))
    s.quote("{parent}", ["Thank you for telling me the truth. I am proud of you.",
                         "Accidents happen. What matters is that you were honest.",
                         "I am not angry. Telling the truth was brave."], ("said", "said softly"))
    s.say("Together they cleaned up the pieces.", "{Parent} gave {name} a big hug.",
          "They glued the {breakable} back together.")
    happy_end(s)
    moral(s, ["Always tell the truth.", "Being honest is better than hiding a mistake.",
              "Everyone makes mistakes. Saying sorry makes it better."],
              ["{name} always told the truth.", "{name} was always careful near the {breakable}."])


BUILDS = [  # (what, what ruins it, how, the only place it can be built or None)
    ("a sandcastle", "a big wave", "washed it away", "the beach"),
    ("a tall tower of blocks", "a cat", "knocked it over", None),
    ("a snowman", "a big dog", "knocked off its head", "the snowy hill"),
    ("a fort of pillows", "a big dog", "jumped on it", None),
    ("a little boat of sticks", "the water", "broke it apart", "the river"),
    ("a bird house", "the wind", "blew it down", None),
    ("a tower of stones", "a rolling ball", "knocked it down", None),
]


def plot_building(s: Story) -> None:
    what, enemy, ruin, _ = s.rng.choice([b for b in BUILDS if b[3] in (None, s.ctx["place"])])
    s.ctx.update(build=what, enemy=enemy, ruin=ruin)
    set_scene(s)
    meet_friend(s)
    s.quote("{name}", ["Let's build {build}!", "I have an idea. We can build {build}!",
                       "Do you want to build {build}?"],
            ("said",))
    s.say("They worked hard all morning.", "They worked and worked.", "{Name} carried things and {fname} stacked them.")
    s.say("It was the best one they had ever made.", "Soon they had {build}. It was wonderful.")
    s.say("But then {enemy} came and {ruin}!", "Suddenly, {enemy} {ruin}.")
    s.say("{Name} was very sad.", "{Name} wanted to cry.", "{Fname} sat down and sighed.")
    s.quote("{name}", ["All our work is gone!", "It's ruined!", "Now we have nothing."], ("cried", "said"))
    s.quote("{fname}", ["We can build it again. This time even better!", "Let's try again. We can do it together.",
                        "Don't give up! We know how to do it now."], ("said",))
    s.say("So they started again.", "They tried again, and this time they worked as a team.")
    s.say("This time it was even bigger and stronger.", "The new one was even better than the first.")
    happy_end(s)
    moral(s, ["Don't give up when things go wrong.", "Working together makes things better.",
              "If at first you don't succeed, try again."],
              ["{name} never gave up so quickly.", "{name} liked to build things with friends."])


def plot_race(s: Story) -> None:
    s.go_outside()
    set_scene(s)
    s.say("There was a big race {at} that day.", "All the animals and children were having a race.")
    s.say("{Name} wanted to win more than anything.", "{Name} was sure {he} would be the fastest.")
    s.quote("{name}", ["I will win the race!", "I am the fastest of all!", "Watch me win!"], ("said", "shouted"))
    s.say("Ready, set, go! Everyone started to run.", "The race began and {name} ran as fast as {he} could.")
    s.say("{Name} was in front.", "{Name} ran past everyone.")
    s.say("Then {he} heard a cry behind {him}. {Fname} had fallen down.",
          "Then {name} saw that {fname} had tripped and hurt {fhis} knee.")
    s.say("{Name} could keep running and win. Or {he} could stop.", "{Name} stopped. {He} thought hard.")
    s.say("{Name} turned around and ran back to {fname}.", "{Name} went back to help {fname} up.")
    s.quote("{name}", ["Are you okay? Let me help you.", "Hold my hand. We can finish together."], ("said",))
    s.say("They walked to the finish line together.", "Side by side, they crossed the finish line last.")
    s.say("{Name} did not win the race.", "Everyone else had already finished.")
    s.say("But everyone clapped for {name} and {fname}.",
          "But {parent} said it was the kindest thing {he} had ever seen.")
    happy_end(s)
    moral(s, ["Being kind is better than winning.", "A true friend helps you up when you fall.",
              "Helping others is the real prize."],
              ["{name} cared more about friends than about winning.", "{name} always stopped to help."])


PLANTS = ["sunflower", "tomato", "bean", "pumpkin", "carrot", "apple tree", "rose", "strawberry"]


def plot_garden(s: Story) -> None:
    s.ctx["plant"] = plant = s.rng.choice(PLANTS)
    s.ctx["a_plant"] = f"{article(plant)} {plant}"
    s.say("{Parent} gave {name} a tiny seed.", "{Name} found a little seed {at}.")
    s.quote("{parent}", ["If you plant it and take care of it, it will grow into {a_plant}.",
                         "This seed will grow into {a_plant}, but you must be patient."], ("said",))
    s.say("{Name} dug a hole and put the seed in the dirt.", "{Name} planted the seed in a little pot.")
    s.say("Every day {name} gave it water.", "{He} watered it every morning.")
    s.say("But nothing happened.", "The next day, {name} looked. There was nothing!", "Days went by and nothing grew.")
    s.quote("{name}", ["Why is it not growing?", "It is taking too long!", "Maybe my seed is broken."],
            ("said", "asked", "sighed"))
    s.quote("{parent}", ["Good things take time.", "Be patient. The seed is busy under the ground.",
                         "Keep caring for it. You will see."], ("said", "smiled"))
    s.say("So {name} waited.", "{Name} kept watering it and singing to it.", "{Name} tried to be patient.")
    s.say("One morning, there was a little green sprout!", "Then one day, a tiny green leaf came out of the dirt.")
    s.say("It grew and grew until it was {a_plant}.", "Weeks later, it was a big {plant}.")
    s.quote("{name}", ["Look! My {plant}!", "It grew! It really grew!"], ("shouted", "said"))
    s.maybe(0.5, "{Name} shared it with {fname}.", "{Name} showed it to everyone.")
    happy_end(s)
    moral(s, ["Good things come to those who wait.", "Patience and care help things grow.",
              "Taking care of something every day makes it strong."],
              ["{name} was a little more patient.", "{name} watered {his} {plant} every day."])


NEW_THINGS = [
    ("ride a bike", "fell over", "pedaled all the way down the street"),
    ("swim", "sank and splashed", "floated and kicked across the pool"),
    ("eat broccoli", "made a funny face", "took a big bite and found it tasty"),
    ("tie {his} shoes", "made a knot that fell apart", "made two loops and a perfect bow"),
    ("whistle", "only blew air", "made a long, clear whistle"),
    ("read a whole book", "got stuck on a big word", "read every page to {parent}"),
    ("jump rope", "tripped on the rope", "jumped ten times in a row"),
    ("fly a kite", "watched the kite crash", "held the string while the kite flew high"),
]


def plot_try_new(s: Story) -> None:
    goal, fail, win = s.rng.choice(NEW_THINGS)
    s.ctx.update(goal=goal.format_map(s.ctx), fail=fail, win=win.format_map(s.ctx))
    s.say("{Name} wanted to learn to {goal}.", "{Name} had never learned to {goal}.",
          "All of {his} friends could {goal}, but not {name}.")
    s.say("{time}, {he} tried for the first time.", "{time}, {parent} said it was time to try.")
    s.say("But {name} {fail}.", "{Name} tried, but {he} {fail}.")
    s.quote("{name}", ["I can't do it!", "This is too hard!", "I will never learn."], ("cried", "said", "grumbled"))
    s.quote("{parent}", ["Everyone has to practice. Try again.", "You can do it. One more time.",
                         "Even {fname} had to practice."], ("said",))
    s.say("{Name} tried again. And again.", "So {name} practiced every day.", "{Name} did not give up.")
    s.maybe(0.6, "Sometimes {he} {fail} again.", "It was still hard.")
    s.say("Then one day, {name} {win}!", "Finally, {name} {win}.")
    s.quote("{name}", ["I did it!", "Look at me! I can {goal}!", "I knew I could do it!"], ("shouted", "cheered"))
    happy_end(s)
    moral(s, ["Practice makes things easier.", "Never give up on something new.", "Trying is how we learn."],
              ["{name} loved to {goal}.", "{name} tried new things without being scared."])


def plot_surprise(s: Story) -> None:
    s.say("It was {parent}'s birthday soon.", "{Parent} had been very tired all week.",
          "{Fname}'s birthday was coming.")
    s.say("{Name} wanted to make a surprise.", "{Name} had a secret plan.")
    s.quote("{name}", ["I will make a card and a cake!", "I will make the best surprise ever!"], ("whispered", "said"))
    s.say("{He} got paper, glue and crayons.", "{He} found flour, eggs and sugar in the kitchen.")
    s.say("But the glue got on the floor and the flour went everywhere!", "It was much harder than {he} thought.",
          "The cake came out flat and a little burnt.")
    s.say("{Name} looked at the mess and felt sad.", "{Name} thought the surprise was ruined.")
    s.say("Then the door opened.", "Just then, {parent} came in.")
    s.quote("{name}", ["Surprise! It is not very good.", "Surprise! I am sorry about the mess."], ("said",))
    s.quote("{parent}", ["It is perfect, because you made it with love.", "This is the best surprise I have ever had!"],
            ("said", "laughed"))
    s.say("They cleaned up together and ate the cake anyway.", "{Parent} put the card on the wall for everyone to see.")
    happy_end(s)
    moral(s, ["A gift made with love is the best gift.", "It is the thought that counts.",
              "Love matters more than being perfect."],
              ["{name} made a card for everyone on their birthday.",
               "{name} knew love matters more than being perfect."])


DISCOVERIES = [
    ("an old wooden box", "inside were shiny buttons and a letter from long ago"),
    ("a little door in a tree", "behind it lived a family of mice having tea"),
    ("a secret path", "it led to a pond full of golden fish"),
    ("a map with a big red X", "at the X was a box of old toys"),
    ("a cave", "inside a bear was sleeping, so they tiptoed away"),
    ("a glowing stone", "it glowed brighter when {name} smiled"),
    ("a nest of eggs", "soon the eggs hatched into tiny birds"),
    ("a message in a bottle", "it said: be kind to everyone you meet"),
]


def plot_discovery(s: Story) -> None:
    s.go_outside()
    found, inside = s.rng.choice(DISCOVERIES)
    s.ctx.update(found=found, inside=inside.format_map(s.ctx))
    set_scene(s)
    s.say("{Name} liked to explore.", "{Name} wanted to go on an adventure.")
    meet_friend(s)
    s.quote("{fname}", ["Let's go exploring!", "I know a place nobody has seen!", "Do you want to go on an adventure?"],
            ("said", "whispered"))
    s.say("They walked past {sight}.", "They went {spot} and then further.")
    s.say("Then they found {found}!", "Suddenly, {name} saw {found}.")
    s.quote("{name}", ["What is this?", "Wow! Look at that!", "Should we look closer?"], ("asked", "said"))
    s.say("They looked closer, and {inside}.", "Slowly they came closer, and {inside}.")
    s.say("It was the most amazing thing they had ever seen.", "They could not believe their eyes.")
    s.say("When they got home, they told {parent} all about it.", "At home, {name} could not stop talking about it.")
    s.maybe(0.5, "{Parent} listened and smiled.", "{Parent} said it sounded like a wonderful adventure.")
    happy_end(s)
    moral(s, ["The world is full of wonderful surprises.", "Adventures are better with a friend.",
              "Being curious helps you learn new things."],
              ["{name} went exploring every week.", "{name} always remembered that day."])


def plot_weather(s: Story) -> None:
    s.say("{Name} and {fname} planned to {fun} {at}.", "{Name} wanted to {fun} {at} with {fname}.")
    s.say("But when {he} woke up, it was raining hard.", "But then dark clouds came and it began to rain.")
    s.quote("{name}", ["Now we can't go outside!", "The rain ruined everything!", "This is the worst day!"],
            ("said", "grumbled", "sighed"))
    s.say("{Name} sat by the window and frowned.", "{Name} pressed {his} nose to the window.")
    s.quote("{parent}", ["Rainy days can be fun too. Let's see what we can do.",
                         "Why don't you build a fort inside?", "Let's put on our boots!"], ("said",))
    s.say("{Name} and {fname} built a fort of blankets and read stories inside.",
          "They put on boots and jumped in every puddle.",
          "They baked {treat} and played games on the floor.")
    s.say("It was so much fun that they forgot about the rain.", "They laughed and laughed.")
    s.say("When the rain stopped, a big rainbow came out.", "Later, the sun came back and they saw a rainbow.")
    s.quote("{fname}", ["Look, a rainbow!", "That was the best rainy day!"], ("said", "shouted"))
    happy_end(s)
    moral(s, ["You can have fun on any day.", "Good things can come from bad weather.",
              "A happy heart finds fun everywhere."],
              ["{name} did not mind the rain.", "{name} loved to jump in puddles."])


def plot_greedy(s: Story) -> None:
    s.say("{Parent} baked a big plate of {treat}.", "There was a big jar of {treat} in the kitchen.")
    s.quote("{parent}", ["You may have two, and save the rest for later.",
                         "Only a few, please. They are for everyone."],
            ("said",))
    s.say("But the {treat} looked so yummy.", "But {name} wanted more.")
    s.say("When no one was looking, {name} ate one, then another, then another.",
          "{Name} ate and ate until the plate was almost empty.")
    s.say("Soon {his} tummy began to hurt.", "Then {name} felt sick.")
    s.quote("{name}", ["Ow, my tummy hurts.", "I ate too many."], ("groaned", "said"))
    s.say("{Parent} saw the empty plate.", "{Parent} came and saw what had happened.")
    s.quote("{parent}", ["Too much of a good thing can make you feel bad.", "Next time, listen when I say just two."],
            ("said", "said gently"))
    s.say("{Name} said sorry, and {parent} made {him} a cup of warm tea.", "{Name} said sorry and rested on the sofa.")
    s.say("The next day, {name} shared {his} {treat} with {fname}.", "The next time, {name} took just two.")
    happy_end(s)
    moral(s, ["Too much of a good thing is not good.", "Listen to the people who care for you.",
              "It is better to share than to eat everything."],
              ["{name} only ate what {he} needed.", "{name} listened to {parent}."])


PLOTS = [plot_lost, plot_sharing, plot_new_friend, plot_fear, plot_helping, plot_mistake, plot_building,
         plot_race, plot_garden, plot_try_new, plot_surprise, plot_discovery, plot_weather, plot_greedy]

# ---------------------------------------------------------------------------------------------
# Public API

_SPLITS = ("train", "val")


def story(seed: int, index: int, split: str = "train") -> str:
    """Story number `index` of `split` for `seed`: a pure function of the three."""
    # one independent random stream per story, so stories can be made in any order or in parallel
    rng = random.Random(f"nanomoe-stories/{GENERATOR_VERSION}/{seed}/{split}/{index}")
    s = Story(rng, _cast(rng))
    opening(s)
    rng.choice(PLOTS)(s)
    return s.text()


def generate_stories(seed: int = 0, size_bytes: int | None = None, split: str = "train",
                     count: int | None = None) -> Iterator[str]:
    """Stories of `split` in order until `size_bytes` UTF-8 bytes or `count` stories (endless if neither)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    total = 0
    i = 0
    while (size_bytes is None or total < size_bytes) and (count is None or i < count):
        text = story(seed, i, split)
        total += len(text.encode("utf-8"))
        i += 1
        yield text
