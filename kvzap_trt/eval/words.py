"""Word lists the generators draw from: short, common, single-token-ish English words, written out
here so that nothing is downloaded (RULER draws the same kinds from the `wonderwords` package)."""

ADJECTIVES = (
    "ancient brave calm cheerful clever curious damp eager elegant fancy fierce gentle gleaming grumpy "
    "hollow humble icy jolly lively lucky mellow misty noble odd polite proud quiet rapid rustic shiny "
    "silent sleepy smooth sour spicy steady sturdy sweet tame tidy tiny vast velvet wicked witty young "
    "zealous amber bitter crimson dusty"
).split()

NOUNS = (
    "anchor apple badge basket beacon blanket bottle bridge candle canyon carpet castle cloud compass "
    "cottage crystal desert dolphin dragon engine falcon feather forest fountain garden glacier hammer "
    "harbor helmet island jacket kettle ladder lantern lemon meadow mirror monkey needle orchard oyster "
    "palace pebble pencil pepper piano pillow planet pocket puzzle rabbit ribbon river rocket saddle "
    "shadow shovel spider statue tiger tunnel turtle violin wagon walnut whistle window wizard"
).split()

FIRST_NAMES = (
    "Alma Bruno Clara Dmitri Edith Felix Greta Hugo Irene Jonas Katja Lars Mira Nils Olga Pavel Rosa "
    "Stefan Tilda Umberto Vera Walter Yara Zoltan"
).split()

LAST_NAMES = (
    "Abbott Brandt Castell Dorsey Eklund Falk Gruber Holm Ivers Janssen Kovac Lindqvist Moreau Novak "
    "Ostrom Pereira Quint Rasmussen Sorel Tanaka Ulrich Varga Wendt Zeller"
).split()

TOWNS = (
    "Ashford Brightwater Coldharbor Dunmore Elmstead Fernhill Glenrock Hartwell Ironbridge Kingsmere "
    "Larkspur Millbrook Northwick Oakhaven Pinecrest Queensbury Redcliff Stonebury Thornbury Westmere"
).split()

OCCUPATIONS = (
    "baker carpenter chemist fisherman glassblower jeweller librarian locksmith potter sailor surveyor "
    "tailor teacher watchmaker weaver"
).split()
