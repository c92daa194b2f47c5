"""The fidelity world: reproducible scenes, captions, resolution-independent renders, and the scene checker."""

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

import training.world as world
from benchmarks.fidelity.checker import check_scene, label_image
from training.world import (
    KINDS,
    PALETTE,
    REGIONS,
    TEXTURES,
    Scene,
    Shape,
    read_scenes,
    region_box,
    render,
    sample_scenes,
    shape_polygon,
    texture_color,
    world_corpus,
    write_scenes,
)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(60, seed=1)


def test_scenes_are_reproducible_from_the_seed(scenes):
    assert sample_scenes(60, seed=1) == scenes
    assert sample_scenes(10, seed=1) == scenes[:10]  # a longer list extends a shorter one
    assert sample_scenes(10, seed=2) != scenes[:10]
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}


def test_shapes_lie_inside_their_regions(scenes):
    for shape in (s for scene in scenes for s in scene.shapes):
        x0, y0, x1, y1 = region_box(shape.region)
        (cx, cy), r = shape.center, shape.radius
        assert x0 < cx - r and cx + r < x1 and y0 < cy - r and cy + r < y1


def test_caption_states_every_shape_and_the_background():
    scene = Scene(
        shapes=(
            Shape(kind="circle", color="red", region="top left", size="large", center=(1 / 6, 1 / 6)),
            Shape(kind="star", color="yellow", region="center", size="small", center=(0.5, 0.5)),
            Shape(kind="square", color="white", region="bottom right", size="small", center=(5 / 6, 5 / 6)),
        ),
        background="blue",
        texture="striped",
    )
    assert scene.caption == (
        "a large red circle at the top left, a small yellow star at the center and a small white square "
        "at the bottom right on a striped blue background"
    )
    assert Scene(shapes=scene.shapes[:1], background="blue").caption == (
        "a large red circle at the top left on a plain blue background"
    )
    corpus = " ".join(world_corpus()).split()
    for word in [*PALETTE, *KINDS, *" ".join(REGIONS).split(), "striped", "dotted", "checkered", "background"]:
        assert word in corpus


def test_scene_json_round_trip_and_validation(scenes, tmp_path):
    path = tmp_path / "scenes.jsonl"
    write_scenes(scenes, path)
    assert read_scenes(path) == scenes
    first = json.loads(path.read_text().splitlines()[0])
    assert first["caption"] == scenes[0].caption
    assert Scene.from_dict(json.loads(json.dumps(scenes[3].to_dict()))) == scenes[3]

    shape = scenes[0].shapes[0]
    with pytest.raises(ValueError, match="shape kind 'hexagon' is not one of circle"):
        dataclasses.replace(shape, kind="hexagon")
    with pytest.raises(ValueError, match=r"shape center must be two numbers \(x, y\), got \[0.5\]"):
        dataclasses.replace(shape, center=[0.5])
    with pytest.raises(ValueError, match=r"shape center \(0.99, 0.99\) is outside its region 'top left'"):
        dataclasses.replace(shape, center=(0.99, 0.99), region="top left")
    with pytest.raises(ValueError, match="distinct regions"):
        Scene(shapes=(shape, shape), background=next(c for c in PALETTE if c != shape.color))
    with pytest.raises(ValueError, match="background colour"):
        Scene(shapes=(shape,), background=shape.color)
    with pytest.raises(ValueError, match="does not match its scene"):
        Scene.from_dict(first | {"caption": "a cat"})
    path.write_text('{"shapes": []}\n')
    with pytest.raises(ValueError, match="scenes.jsonl:1: not a scene"):
        read_scenes(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scenes(tmp_path / "missing.jsonl")


def test_render_is_deterministic_and_resolution_independent(scenes):
    for scene in scenes[:4]:
        small = render(scene, 256)
        assert small.size == (256, 256) and small.mode == "RGB"
        assert np.array_equal(np.asarray(small), np.asarray(render(scene, 256)))
        large = render(scene, 1024)
        assert large.size == (1024, 1024)
        down = np.asarray(large.resize((256, 256), Image.Resampling.BOX)).astype(float)
        diff = np.abs(down - np.asarray(small))
        assert diff.mean() < 2.0  # only anti-aliased edges differ
        assert (label_image(large) == label_image(small)).mean() > 0.99


def test_checker_accepts_the_worlds_own_renders(scenes):
    for size, subset in ((256, scenes), (1024, scenes[:12])):
        checks = [check_scene(render(s, size), s) for s in subset]
        assert np.mean([c.score for c in checks]) >= 0.95, size
        assert np.mean([c.passed for c in checks]) >= 0.95, size
    # Robust to the blur and noise of a generated image.
    rng = np.random.default_rng(0)
    for scene in scenes[:20]:
        pixels = np.asarray(render(scene, 256).filter(ImageFilter.GaussianBlur(1.5))).astype(float)
        noisy = (pixels + rng.normal(0, 15, pixels.shape)).clip(0, 255).astype(np.uint8)
        assert check_scene(noisy, scene).score >= 0.75


def test_checker_rejects_mismatched_descriptions_and_noise(scenes):
    images = [render(s, 256) for s in scenes[:30]]
    shifted = [check_scene(image, scene) for image, scene in zip(images, scenes[1:31], strict=True)]
    assert np.mean([c.score for c in shifted]) < 0.2 and not any(c.passed for c in shifted)
    # One wrong attribute fails that shape (and therefore the scene), whatever the attribute.
    for scene, image in zip(scenes[:15], images, strict=False):
        first = scene.shapes[0]
        swaps = {
            "kind": KINDS[(KINDS.index(first.kind) + 1) % len(KINDS)],
            "size": "small" if first.size == "large" else "large",
        }
        for field, value in swaps.items():
            shapes = (dataclasses.replace(first, **{field: value}), *scene.shapes[1:])
            wrong = dataclasses.replace(scene, shapes=shapes)
            check = check_scene(image, wrong)
            assert not check.shapes[0].ok and check.shapes[0].found and not check.passed, field
    rng = np.random.default_rng(0)
    noise = [check_scene(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), s) for s in scenes[:10]]
    assert not any(c.passed for c in noise) and np.mean([c.score for c in noise]) < 0.4
    assert not any(s.found for c in noise for s in c.shapes)


def test_checker_rejects_bad_images(scenes):
    with pytest.raises(ValueError, match="square"):
        check_scene(Image.new("RGB", (256, 128)), scenes[0])
    with pytest.raises(ValueError, match=r"\(height, width, 3\) uint8"):
        check_scene(np.zeros((64, 64), dtype=np.uint8), scenes[0])


def test_world_tokenizers_have_one_token_per_word(scenes, tmp_path):
    """The teacher's tokenizers (trained on the world's corpus) read a caption word by word: a T5 tokenizer that
    splits colour words into letters leaves the teacher a dozen tokens per word to learn to read."""
    from pipelines.tiny import train_clip_tokenizer, train_t5_tokenizer

    clip = train_clip_tokenizer(tmp_path / "clip", world_corpus())
    t5 = train_t5_tokenizer(tmp_path / "t5", world_corpus())
    for scene in scenes[:20]:
        words = scene.caption.replace(",", " ,").split()
        pieces = t5.convert_ids_to_tokens(t5(scene.caption).input_ids)
        assert pieces == ["▁" + w if w != "," else w for w in words] + ["</s>"]
        assert len(clip(scene.caption).input_ids) == len(words) + 2  # + start and end tokens


@pytest.mark.parametrize("background", ["blue", "white"])
def test_each_texture_covers_its_share_of_the_background_in_its_shade(background):
    """What the caption says is what is drawn: no texture pixels on a plain background; dots (radius a fifth of the
    period: pi / 25 of the area) cover far less than half-period stripes or checks."""
    shape = Shape(kind="circle", color="red", region="top left", size="small", center=(1 / 6, 1 / 6))
    shares = {}
    for texture in TEXTURES:
        pixels = np.asarray(render(Scene(shapes=(shape,), background=background, texture=texture), 256)).astype(int)
        shares[texture] = (np.abs(pixels - np.array(texture_color(background))).max(-1) <= 2).mean()
    assert shares["plain"] == 0
    assert 0.08 < shares["dotted"] < 0.16 and 0.35 < shares["striped"] < 0.6 and 0.35 < shares["checkered"] < 0.6


@pytest.mark.parametrize("background", list(PALETTE))
def test_every_background_texture_shade_is_visibly_apart(background):
    """Toward white on dark colours, black on light ones: a caption's 'striped black background' must show."""
    shade, rgb = texture_color(background), PALETTE[background]
    assert sum(abs(a - b) for a, b in zip(shade, rgb, strict=True)) >= 100


def test_regions_are_row_major_with_x_first_and_hold_their_shapes_centres():
    assert region_box("top right") == (2 / 3, 0, 1, 1 / 3)  # (x0, y0, x1, y1): right column, top row
    square = Shape("square", "red", "top right", "large", (5 / 6, 1 / 6))
    pixels = np.asarray(render(Scene((square,), "blue"), 96))
    assert tuple(pixels[16, 80]) == PALETTE["red"]  # row 16 (top), column 80 (right)
    with pytest.raises(ValueError, match="outside its region"):  # right in x, wrong in y
        Shape("circle", "red", "top left", "small", (0.1, 0.9))


def test_checker_fails_an_extra_shape_and_an_off_palette_colour():
    circle = Shape("circle", "red", "top left", "large", (1 / 6, 1 / 6))
    square = Shape("square", "yellow", "center", "large", (0.5, 0.5))
    check = check_scene(render(Scene((circle, square), "blue"), 256), Scene((circle,), "blue"))
    assert check.extras == 1 and not check.passed and check.score == 2 / 3  # a shape the caption does not state
    stated = Scene((Shape("circle", "red", "center", "large", (0.5, 0.5)),), "blue")
    image = Image.new("RGB", (256, 256), PALETTE["blue"])
    ImageDraw.Draw(image).ellipse([92, 92, 164, 164], fill=(255, 0, 165))  # magenta: red is the nearest entry
    assert not check_scene(image, stated).shapes[0].found


def test_the_triangle_prototype_has_its_mass_low():
    from benchmarks.fidelity import checker

    assert checker._prototypes()["triangle", "large"].features[1] < 0.4  # the share of pixels in the top half


def test_sampled_shapes_keep_the_margin_to_their_cell_edges():
    for scene in sample_scenes(300, seed=0):
        for s in scene.shapes:
            x0, y0, x1, y1 = region_box(s.region)
            (cx, cy), r = s.center, s.radius
            assert min(cx - r - x0, x1 - cx - r, cy - r - y0, y1 - cy - r) >= world._MARGIN - 1e-9


def test_polygon_geometry():  # what stored scene files and the checker's prototypes are drawn with
    c, r = (0.5, 0.5), 0.1
    np.testing.assert_allclose(shape_polygon("square", c, r), [(0.42, 0.42), (0.58, 0.42), (0.58, 0.58), (0.42, 0.58)])
    star = shape_polygon("star", c, r)
    np.testing.assert_allclose(star[0], (0.5, 0.4), atol=1e-12)  # a point up (y grows downwards)
    dists = [math.hypot(x - 0.5, y - 0.5) for x, y in star]
    assert dists[0::2] == pytest.approx([r] * 5) and dists[1::2] == pytest.approx([0.4 * r] * 5)


def test_a_circle_is_drawn_round_and_anti_aliased():
    circle = Shape("circle", "red", "center", "large", (0.5, 0.5))
    pixels = np.asarray(render(Scene((circle,), "blue"), 256)).astype(int)
    red = np.abs(pixels - PALETTE["red"]).max(-1) <= 2
    blue = np.abs(pixels - PALETTE["blue"]).max(-1) <= 2
    ys, xs = np.nonzero(red)
    assert ys.max() - ys.min() == xs.max() - xs.min()
    assert abs(ys.max() - ys.min() + 1 - 2 * 0.14 * 256) <= 3
    assert (~red & ~blue).sum() > 2 * math.pi * 0.14 * 256 / 2  # a ring of blended edge pixels


def test_checkered_alternates_along_rows_and_columns():  # not stripes
    shape = Shape("circle", "red", "bottom right", "small", (5 / 6, 5 / 6))
    pixels = np.asarray(render(Scene((shape,), "blue", "checkered"), 256)).astype(int)
    shade = np.abs(pixels - np.array(texture_color("blue"))).max(-1) <= 2
    cell = 1.5 * 256 / 12
    for i in range(4):
        for j in range(4):
            x, y = int((i + 0.5) * cell), int((j + 0.5) * cell)
            assert shade[y, x] == bool((i + j) % 2), (i, j)


def test_a_scene_file_may_hold_blank_lines(tmp_path):
    scenes = sample_scenes(3, seed=0)
    path = tmp_path / "scenes.jsonl"
    write_scenes(scenes, path)
    path.write_text(path.read_text().replace("\n", "\n\n") + "  \n")
    assert read_scenes(path) == scenes


def test_the_checker_fails_a_shape_stated_in_the_wrong_row():
    shape = Shape(kind="circle", color="red", region="top left", size="large", center=(1 / 6, 1 / 6))
    image = render(Scene(shapes=(shape,), background="blue"), 128)
    moved = dataclasses.replace(shape, region="bottom left", center=(1 / 6, 5 / 6))  # same column, other row
    assert check_scene(image, Scene(shapes=(shape,), background="blue")).shapes[0].ok
    assert not check_scene(image, Scene(shapes=(moved,), background="blue")).shapes[0].found


def test_the_checker_judges_the_largest_component_of_the_stated_colour_in_the_region():
    """Not a stray fragment of that colour: its kind and size would be judged on the fragment."""
    shape = Shape(kind="circle", color="red", region="center", size="small", center=(0.5, 0.5))
    scene = Scene(shapes=(shape,), background="blue")
    image = render(scene, 128)
    ImageDraw.Draw(image).rectangle((44, 44, 49, 49), fill=PALETTE["red"])
    check = check_scene(image, scene)
    assert check.shapes[0].ok, check


def test_a_stated_shape_is_found_only_from_a_share_of_the_smallest_shape_at_its_size():
    """A 10x10 blob (100 px) is a third of no large shape (the smallest, a star, has 382 px): stated large it is
    not found and counts as an extra; stated small (smallest 115 px) it is found."""
    image = Image.new("RGB", (128, 128), PALETTE["blue"])
    ImageDraw.Draw(image).rectangle((59, 59, 68, 68), fill=PALETTE["red"])
    for size, found in (("large", False), ("small", True)):
        shape = Shape(kind="square", color="red", region="center", size=size, center=(0.5, 0.5))
        check = check_scene(image, Scene(shapes=(shape,), background="blue"))
        assert check.shapes[0].found is found and check.extras == int(not found), (size, check)
