"""Word lists shipped with the package (written for this project; nothing is downloaded at run time).

RULER builds its needle keys from adjective-noun pairs ("brave-lantern") and its common-words task
from a list of English nouns, adjectives and verbs. These lists are ours: plain, lowercase English
words, each unique, no word in two lists: about 400 adjectives x 400 nouns, 160,000 keys.
"""

from __future__ import annotations

import functools

_ADJECTIVES = """
able absent abundant acid active actual adorable afraid agile alert alive amber ample ancient angry
anxious aquatic arctic arid aromatic artistic ashamed asleep atomic august autumnal average awake awful
bald balmy bare basic bent best better big bitter bland blank bleak blind blond blue blunt bold bony
bored boring bouncy brave brief bright brisk broad broken bronze brown bumpy busy calm capable careful
careless casual cautious certain cheap cheerful chief chilly chubby civil classic clean clear clever
close cloudy clumsy coarse cold colossal common complex cool cosmic costly cozy crafty crazy creamy
crisp crooked crowded cruel crunchy cuddly curious curly cute damp dapper daring dark dear decent deep
defiant delicate dense dim direct dirty distant dizzy dry dull dusty eager early earnest easy elastic
elder electric elegant eminent empty endless enormous equal even evil exact exotic expert faded faint
fair faithful false famous fancy far fast fat fearless feeble fertile few fierce filthy fine firm
flat flawless fluffy fond foolish formal fragile frank free frequent fresh friendly frozen full funny
fuzzy gentle genuine giant gifted giddy glad gloomy glossy golden good graceful grand grateful great
greedy green grim grumpy guilty hairy handsome happy hard harsh hasty heavy hidden high hollow honest
hopeful hot huge humble hungry icy ideal idle immense innocent inner intense ironic itchy jagged jolly
jovial joyful juicy keen kind large last late lavish lazy lean legal level light likely little lively
local lone long loose loud lovely loyal lucky lunar lush mad magnetic major mature meek mellow merry
messy mighty mild minor misty modern modest moist moral muddy mute narrow nasty naval near neat needy
nervous new nice nimble noble noisy normal nosy numb obedient odd old olive orange ordinary
organic oval pale parallel patient peaceful perfect pink plain pleasant plump polar polite poor
precious pretty proud public pure purple quaint quick quiet rapid rare raw ready real regal remote
rich rigid ripe robust rosy rough round royal rude rural rustic sad safe salty sandy scarce secret
serene severe shaggy shallow sharp shiny short shy silent silky silly simple sincere sleepy slim slow
small smart smooth snowy soft solar solid sour sparse spicy stable stale steady steep sticky stiff
stormy strange strict strong sturdy subtle sudden sunny super sweet swift tall tame tender tense thick
thin tidy tiny tired tough tropical true twin ugly unique upper urban vacant vague valid vast velvet
violet vital vivid wandering warm wary weak wealthy weary wet white whole wide wild windy wise witty
wooden worthy young zealous
"""

_NOUNS = """
acorn actor airport album alley anchor angle ankle answer apple apron arch arena arrow artist attic
avenue badge bakery balcony ball balloon bamboo banana band banner barn barrel basket battery beach
beacon beard bed bee beetle bell bench berry bicycle bird biscuit blanket blossom board boat bone
book boot bottle boulder bowl box bracelet branch bread brick bridge brook broom bubble bucket buffalo
bugle building bunny butter button cabin cactus cake camel camera campus canal candle canoe canyon
captain car carpet carrot castle cat cave ceiling cellar chair chalk channel chapel cherry chest
chicken chimney circle city clock cloud coast coat coconut coin comet compass cookie copper corner
cottage cotton country courage cousin cradle crater crayon creek cricket crown crystal cup cupboard
curtain cushion dagger daisy dancer desert desk diamond dinner dolphin donkey door dragon drawer dream
drum duck eagle earth elbow elephant engine envelope eraser falcon farm feather fence ferry field
finger fire flag flame flute forest fork fountain fox frog galaxy garden gate gem giraffe glacier glass
globe glove goat gold goose grape grass guitar hammer harbor harp hat hawk heart hedge helmet hill
hive honey horizon horse hotel house island ivory jacket jar jewel journal jungle kettle key kingdom
kitchen kite kitten knife ladder lake lamp lantern lawn leaf lemon letter library lighthouse lily
lion lizard lobster locket lotus machine magnet mango map marble market meadow medal melon mirror
mitten monkey moon mountain mouse mushroom museum needle nest network notebook nut oak ocean octopus
office onion orchard otter owl oyster paddle page palace panda paper parrot pasture peach peak pearl
pebble pencil penguin pepper piano pickle picture pillow pilot pine pipe planet plant plate pocket
poem pond portrait potato pouch puddle pumpkin puppet puzzle quarry queen quill rabbit raccoon radio
railway rainbow raven record reef ribbon rice river road robin rocket roof rose ruby saddle sail
salmon sandal satellite saucer scarf school scissors sea seal shadow shell shelf ship shoe shovel
signal silver singer sketch sled slipper snail snake sock sofa soldier sparrow spider spoon squirrel
stadium star statue stone storm stove street studio sugar suitcase summit sunset swan sweater
sword table tablet teacup teapot telescope temple tent thimble thunder ticket tiger timber toast
tomato tower town toy tractor trail train treasure tree trumpet tulip tunnel turtle umbrella valley
vase vessel village violin volcano wagon wall wallet walnut wand warrior watch waterfall wave whale
wheel whistle willow window wing winter wizard wolf word workshop yacht yard zebra
"""

_VERBS = """
accept admire agree allow announce appear argue arrange arrive ask attach attend avoid bake balance
bathe begin behave believe belong bless blink boil borrow bounce breathe build burn bury calculate
call carry catch celebrate change charge chase cheer chew choose clap climb collect comb compare
complain concentrate confess connect consider continue cook copy correct cough count cover crawl
create cross cry cycle dance decide deliver depend describe deserve destroy develop dig discover
divide double drag draw dress drink drive drop earn educate embrace employ encourage enjoy enter
escape examine exercise exist expand explain explore express fasten fetch fill find fix float fly
fold follow forgive gather gaze glow grab greet grow guard guess handle hang happen harvest
hate heal help hike hold hop hover hug hum hunt hurry ignore imagine impress improve include inform
inspect invent invite jog join juggle jump kick kneel knit knock land laugh launch learn lift listen
live look love manage march marry measure melt mend mix move nod notice obey observe offer open order
organize own pack paint park pass pause perform persuade pinch plan play plead please point polish
pour practice praise pray prefer prepare present preserve print promise protect provide pull pump
punch push question quit race rain reach read realize receive recommend reflect refuse relax remain
remember remind repair repeat reply report rescue rest return rinse rise roll rub run rush save
scatter scream search select sew shake share shine shiver shout sing sip sit skate ski sleep slide
smell smile sneeze sniff snore solve sort spell spill spin splash spray sprint squeeze stamp stand
stare start stay steer stir stitch stop stretch study succeed suggest supply support surprise
surround survive swallow sway sweep swim swing talk taste teach tease thank think throw tickle tie
travel trust try tumble turn twist type understand unite unlock unpack use vanish visit wait wake walk
wander want warn wash weave welcome whisper win wink wish wonder work worry wrap write yawn
yell zip
"""


def _unique(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if len(set(words)) != len(words):
        duplicated = sorted({w for w in words if words.count(w) > 1})
        raise AssertionError(f"duplicated words in a shipped list: {duplicated}")
    return words


@functools.lru_cache(maxsize=1)
def adjectives() -> tuple[str, ...]:
    """Lowercase English adjectives, in the order written."""
    return _unique(_ADJECTIVES)


@functools.lru_cache(maxsize=1)
def nouns() -> tuple[str, ...]:
    """Lowercase English nouns, in the order written."""
    return _unique(_NOUNS)


@functools.lru_cache(maxsize=1)
def verbs() -> tuple[str, ...]:
    """Lowercase English verbs, in the order written."""
    return _unique(_VERBS)


@functools.lru_cache(maxsize=1)
def all_words() -> tuple[str, ...]:
    """Every shipped word once, sorted: the common-words task draws from these."""
    return tuple(sorted(set(adjectives()) | set(nouns()) | set(verbs())))
