import pytest
import torch

from captioning.data import CaptionDataset, EpochBatchSampler, collate_captions
from captioning.images import Transform, load_rgb, normalize, scaled_side
from captioning.layout import read_split
from captioning.text import Vocabulary


def test_collate_pads_sorts_and_maps_captions_to_images():
    images = [torch.full((3, 4, 4), float(i)) for i in range(2)]
    batch = [(images[0], [torch.tensor([1, 5, 2]), torch.tensor([1, 5, 6, 7, 2])]),
             (images[1], [torch.tensor([1, 8, 9, 2])])]
    out_images, captions, lengths, image_index = collate_captions(batch)
    assert out_images.shape == (2, 3, 4, 4)
    assert lengths.tolist() == [5, 4, 3]  # longest first, as pack_padded_sequence wants
    assert captions.tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 2, 0], [1, 5, 2, 0, 0]]
    assert image_index.tolist() == [0, 1, 0]
    assert out_images[image_index[1], 0, 0, 0] == 1.0


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes():
    full = EpochBatchSampler(10, 3, seed=1, epoch=2).batches()
    assert [len(b) for b in full] == [3, 3, 4]  # a last batch of 1 joins the one before (BatchNorm)
    assert sorted(i for b in full for i, _ in b) == list(range(10))
    assert full == EpochBatchSampler(10, 3, seed=1, epoch=2).batches()
    assert full != EpochBatchSampler(10, 3, seed=1, epoch=3).batches()
    assert list(EpochBatchSampler(10, 3, seed=1, epoch=2, start=1)) == full[1:]
    assert len(EpochBatchSampler(10, 3, seed=1, epoch=2, start=1)) == 2


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 129, 130])
def test_every_dataset_size_gives_batches_batchnorm_can_use(size, world):
    """Every process gets at least 2 images a step, every image is seen each epoch, and a
    dataset smaller than that is repeated with fresh item seeds (so fresh crops)."""
    batch = 128 if size > 100 else 4
    shares = [EpochBatchSampler(size, batch, seed=0, epoch=0, rank=r, world=world).batches() for r in range(world)]
    steps = {len(s) for s in shares}
    assert len(steps) == 1  # every process takes every step
    items = [item for s in shares for b in s for item in b]
    assert all(len(b) >= 2 for s in shares for b in s)
    assert {i for i, _ in items} == set(range(size))
    assert len({seed for _, seed in items}) == len(items)  # no two items share a seed
    if size >= 2 * world:
        assert len(items) == size  # nothing repeated when the data suffices
    if size == 129 and world == 1:
        assert [len(b) for b in shares[0]] == [129]  # 128 + 1: the 1 joins the batch before


def test_a_batch_below_two_images_per_process_is_refused():
    with pytest.raises(ValueError, match="fewer than 2 per process"):
        EpochBatchSampler(10, 3, seed=0, epoch=0, world=2)


def test_dataset_items_and_augmentation_depend_only_on_item_seed(tiny_data):
    split = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in split.captions.values() for c in cs], 1)
    dataset = CaptionDataset(split, vocab, Transform(64, random_crop=True, hflip=True))
    image, captions = dataset[(0, 123)]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert len(captions) == 5 and captions[0][0] == vocab.start_id
    assert torch.equal(dataset[(0, 123)][0], image)
    assert any(not torch.equal(dataset[(0, s)][0], image) for s in range(124, 130))


def test_eval_transform_is_the_centre_crop_of_the_train_scale(tiny_data):
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    split = read_split(tiny_data, "val")
    image = load_rgb(split.image_path(split.images[0]))
    side = scaled_side(64)  # 73: the crops of training are taken from this scale
    offset = (side - 64) // 2
    expected = image.resize((side, side), Image.Resampling.BILINEAR).crop((offset, offset, offset + 64, offset + 64))
    assert torch.equal(Transform(64)(image), normalize(pil_to_tensor(expected)))
    random_crop = Transform(64, random_crop=True)
    with pytest.raises(ValueError, match="needs the item's rng"):
        random_crop(image)


def test_distributed_ranks_share_every_batch_of_the_single_process_run():
    whole = EpochBatchSampler(10, 4, seed=1, epoch=0).batches()  # batches of 4, 4, 2
    shares = [EpochBatchSampler(10, 4, seed=1, epoch=0, rank=r, world=2).batches() for r in range(2)]
    assert [len(b) for b in whole] == [4, 4, 2]
    # 2 images cannot give 2 processes 2 each: the last batch joins the one before
    assert [[len(b) for b in s] for s in shares] == [[2, 3], [2, 3]]
    assert sorted(sum((s[0] for s in shares), [])) == sorted(whole[0])
    assert sorted(sum((s[1] for s in shares), [])) == sorted(whole[1] + whole[2])
    assert len(EpochBatchSampler(10, 4, seed=1, epoch=0, rank=1, world=2, start=1)) == 1


def test_captions_per_image_draws_that_many_distinct_captions_anew_each_epoch(tiny_data):
    split = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in split.captions.values() for c in cs], 1)
    dataset = CaptionDataset(split, vocab, Transform(32), captions_per_image=2)
    every = {tuple(c.tolist()) for c in dataset.captions[0]}
    draws = [tuple(tuple(c.tolist()) for c in dataset[(0, seed)][1]) for seed in range(40)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= every for d in draws)
    assert draws[0] == tuple(tuple(c.tolist()) for c in dataset[(0, 0)][1])  # the seed decides
    assert len({frozenset(d) for d in draws}) > 3  # other seeds (epochs), other pairs
    everything = CaptionDataset(split, vocab, Transform(32), captions_per_image=0)
    assert {tuple(c.tolist()) for c in everything[(0, 7)][1]} == every


def test_each_item_draws_one_of_the_cached_views_by_its_seed(tiny_data):
    import numpy as np

    from captioning.data import FeatureDataset

    split = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in split.captions.values() for c in cs], 1)
    views = np.stack([np.full((len(split.images), 4), v, np.float16) for v in range(3)], axis=1)  # view v holds v
    dataset = FeatureDataset(split, vocab, views)
    drawn = [int(dataset[(5, seed)][0][0]) for seed in range(60)]
    assert set(drawn) == {0, 1, 2}  # every view is drawn, by the item seed
    assert drawn == [int(dataset[(5, seed)][0][0]) for seed in range(60)]
    single = FeatureDataset(split, vocab, views[:, :1])
    assert {int(single[(5, seed)][0][0]) for seed in range(20)} == {0}
