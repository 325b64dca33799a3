import json
import os
import subprocess
import sys
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet import deblender as deblender_module
from starnet.model_files import (describe_model, metadata_checksum, weights_checksum,
                                 write_atomically)

PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=['r', 'i'])
SMALL = dict(hidden=8, tile_hidden=16, stamp_size=7)
FIT = dict(batches_per_epoch=1, batch_size=2, image_shape=(16, 16), n_validation=2,
           progress=False)


def tiny_deblender(*, background=(686.0, 1123.0), **kwargs):
    return StarNetDeblender(prior=PRIOR, psf=PSF, background=list(background),
                            **{**SMALL, **kwargs})


def failing_save(obj, file, *args, **kwargs):
    """A torch.save that writes part of a file and then fails, like a full disk."""
    file.write(b'PK\x03\x04 the first bytes of a model')
    raise OSError(28, 'No space left on device')


def assert_same_weights(first, second):
    for (name, a), b in zip(first.encoder.state_dict().items(),
                            second.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def rewrite(path, change):
    """Load a model file, let ``change(metadata, state)`` edit it, and write it back with
    the checksum of its metadata updated (to test the checks behind it)."""
    state = torch.load(path, weights_only=True)
    metadata = json.loads(state['metadata'])
    change(metadata, state)
    if 'sha256' in metadata:
        metadata['sha256'] = metadata_checksum(metadata)
    state['metadata'] = json.dumps(metadata)
    torch.save(state, path)


# ---------------------------------------------------------------- atomic writes
def test_write_atomically_replaces_in_full_or_not_at_all(tmp_path):
    path = tmp_path / 'file.bin'
    path.write_bytes(b'old contents')

    def interrupted(file):
        file.write(b'new, half writ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, interrupted)
    assert path.read_bytes() == b'old contents'
    assert os.listdir(tmp_path) == ['file.bin']
    write_atomically(path, lambda file: file.write(b'new contents'))
    assert path.read_bytes() == b'new contents'
    assert os.listdir(tmp_path) == ['file.bin']


def test_interrupted_save_keeps_the_old_model(tmp_path, monkeypatch):
    path = tmp_path / 'model.pt'
    old = tiny_deblender(seed=1)
    old.save(path)
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='No space left'):
        tiny_deblender(seed=2).save(path, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['model.pt']
    assert_same_weights(StarNetDeblender.load(path), old)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        tiny_deblender(seed=2).save(path)


@pytest.mark.skipif(sys.platform == 'win32', reason='needs POSIX file-size limits')
def test_save_past_the_file_size_limit_keeps_the_old_model(tmp_path):
    """A real write that fails part way: the process may write only 4 kB per file."""
    path = tmp_path / 'model.pt'
    old = tiny_deblender(seed=1)
    old.save(path)
    assert path.stat().st_size > 8192
    script = (
        "import resource, signal, sys\n"
        "from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender\n"
        "psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)\n"
        "new = StarNetDeblender(prior=StarFieldPrior(mu=0.05, bands=['r', 'i']), psf=psf,\n"
        "                       background=[686.0, 1123.0], hidden=8, tile_hidden=16,\n"
        "                       stamp_size=7, seed=2)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    new.save(sys.argv[1], overwrite=True)\n"
        "except Exception as error:\n"
        "    print('refused:', type(error).__name__)\n")
    result = subprocess.run([sys.executable, '-c', script, str(path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('refused:'), result.stdout
    assert os.listdir(tmp_path) == ['model.pt']
    assert_same_weights(StarNetDeblender.load(path), old)


def test_interrupted_checkpoint_keeps_the_last_epoch(tmp_path, monkeypatch):
    checkpoint = tmp_path / 'fit.ckpt'
    tiny_deblender(seed=2).fit(n_epochs=1, checkpoint=checkpoint, **FIT)
    written = checkpoint.read_bytes()
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='No space left'):
        tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, **FIT)
    monkeypatch.undo()
    assert checkpoint.read_bytes() == written
    assert os.listdir(tmp_path) == ['fit.ckpt']
    history = tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, **FIT)
    assert history['epoch'].tolist() == [1, 2]


# ------------------------------------------------------------ checkpoint resume
@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of one epoch of ``tiny_deblender(seed=2)`` with ``FIT``."""
    path = tmp_path / 'fit.ckpt'
    tiny_deblender(seed=2).fit(n_epochs=1, checkpoint=path, **FIT)
    return path


@pytest.mark.parametrize('deblender, changes, key', [
    (dict(background=(700.0, 1123.0)), {}, "model 'background'"),
    (dict(hidden=4), {}, "model 'hidden'"),
    (dict(max_sources=2), {}, "model 'max_sources'"),
    ({}, dict(image_shape=(24, 24)), "training setting 'image_shape' ([16, 16] in the "
                                     "checkpoint, [24, 24] now)"),
    ({}, dict(batch_size=4), "training setting 'batch_size'"),
])
def test_resume_refuses_another_model_or_settings(checkpoint, deblender, changes, key):
    written = checkpoint.read_bytes()
    with pytest.raises(ValueError, match='use a new checkpoint path') as error:
        tiny_deblender(seed=2, **deblender).fit(n_epochs=2, checkpoint=checkpoint,
                                                **{**FIT, **changes})
    assert key in str(error.value)
    assert str(checkpoint) in str(error.value)
    assert checkpoint.read_bytes() == written


def test_resume_refuses_another_psf(checkpoint):
    other = PowerLawPSF(sigma1=1.2, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    deblender = StarNetDeblender(prior=PRIOR, psf=other, background=[686.0, 1123.0], **SMALL)
    with pytest.raises(ValueError, match="model 'psf'"):
        deblender.fit(n_epochs=2, checkpoint=checkpoint, **FIT)


def test_resume_accepts_a_new_rate_and_more_epochs(checkpoint):
    """As scripts/train_sdss_m2.py does: one call per epoch, each at its own rate, the
    first at the epoch already done (which trains nothing)."""
    deblender = tiny_deblender(seed=2)
    history = deblender.fit(n_epochs=1, checkpoint=checkpoint, learning_rate=5e-4, **FIT)
    assert history['epoch'].tolist() == [1]
    history = deblender.fit(n_epochs=2, checkpoint=checkpoint, learning_rate=2e-4,
                            weight_decay=1e-4, **FIT)
    assert history['epoch'].tolist() == [1, 2]
    assert len(torch.load(checkpoint, weights_only=True)['history']) == 2


def test_resume_refuses_fewer_epochs_than_done(checkpoint):
    tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, **FIT)
    with pytest.raises(ValueError, match='already holds 2 epochs but n_epochs is 1'):
        tiny_deblender(seed=2).fit(n_epochs=1, checkpoint=checkpoint, **FIT)


def test_old_checkpoint_resumes_with_a_warning(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    del state['metadata']           # as written before checkpoints carried settings
    torch.save(state, checkpoint)
    with pytest.warns(UserWarning, match='older starnet'):
        history = tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, **FIT)
    assert history['epoch'].tolist() == [1, 2]


def test_checkpoint_from_before_a_new_setting_resumes_with_its_default(checkpoint):
    """A checkpoint written before ``count_score_weight`` existed was trained without
    the count score: it resumes with the default, and is refused with another weight."""
    state = torch.load(checkpoint, weights_only=True)
    metadata = json.loads(state['metadata'])
    for key in ('count_score_weight', 'count_blocks'):
        del metadata['training_settings'][key]
    state['metadata'] = json.dumps(metadata)
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="'count_score_weight' \\(0.0 in the checkpoint"):
        tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, count_score_weight=1.0,
                                   **FIT)
    history = tiny_deblender(seed=2).fit(n_epochs=2, checkpoint=checkpoint, **FIT)
    assert history['epoch'].tolist() == [1, 2]


def test_resume_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / 'fit.ckpt'
    tiny_deblender().save(path)
    with pytest.raises(ValueError, match='is not a starnet training checkpoint'):
        tiny_deblender().fit(n_epochs=1, checkpoint=path, **FIT)


def test_training_history_survives_save_and_load(tmp_path):
    """The history read back equals the fitted one, its counts still whole numbers."""
    deblender = tiny_deblender(seed=4)
    history = deblender.fit(n_epochs=2, **FIT)
    deblender.save(tmp_path / 'model.pt')
    loaded = StarNetDeblender.load(tmp_path / 'model.pt').training_history
    assert loaded.colnames == history.colnames
    for name in history.colnames:
        np.testing.assert_array_equal(loaded[name], history[name])
    assert loaded['epoch'].tolist() == [1, 2] and loaded['epoch'].dtype.kind == 'i'
    assert loaded['steps'].dtype.kind == 'i'


# ------------------------------------------------------------ verified loading
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / 'model.pt'
    tiny_deblender(seed=3).save(path)
    return path


def test_saved_file_carries_the_checksum_of_its_weights(saved):
    state = torch.load(saved, weights_only=True)
    checksum = json.loads(state['metadata'])['weights_sha256']
    assert len(checksum) == 64 and int(checksum, 16) >= 0
    assert checksum == weights_checksum({'weights': state['weights']})
    assert StarNetDeblender.load(saved).encoder.n_colors == 1


def test_checksum_depends_on_every_byte_and_on_names():
    weights = {'a': torch.zeros(3), 'b': torch.ones(2, 2)}
    reference = weights_checksum({'weights': weights})
    flipped = {'a': torch.zeros(3), 'b': torch.tensor([[1.0, 1.0], [1.0, 1.0000001]])}
    renamed = {'a': torch.zeros(3), 'c': torch.ones(2, 2)}
    reshaped = {'a': torch.zeros(3), 'b': torch.ones(4)}
    assert len({reference, weights_checksum({'weights': flipped}),
                weights_checksum({'weights': renamed}),
                weights_checksum({'weights': reshaped})}) == 4


def test_load_refuses_flipped_bytes_in_the_weights(saved):
    data = bytearray(saved.read_bytes())
    archive = zipfile.ZipFile(saved)
    largest = max((i for i in archive.infolist() if '/data/' in i.filename),
                  key=lambda i: i.file_size)
    assert largest.file_size > 4000
    header = largest.header_offset       # local header: 30 bytes, name, extra field
    start = (header + 30 + int.from_bytes(data[header + 26:header + 28], 'little')
             + int.from_bytes(data[header + 28:header + 30], 'little'))
    middle = start + (largest.file_size - 2000) // 2
    for i in range(middle, middle + 2000):
        data[i] ^= 0x5A
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='is corrupted: checksum of the weights does not '
                                         'match') as error:
        StarNetDeblender.load(saved)
    assert str(saved) in str(error.value)


def test_load_refuses_changed_weights(saved):
    def change(metadata, state):
        with torch.no_grad():
            state['weights']['head.bias'][0] += 1e-3
    rewrite(saved, change)
    with pytest.raises(ValueError, match='checksum of the weights does not match'):
        StarNetDeblender.load(saved)


def test_load_refuses_non_finite_weights(saved):
    def change(metadata, state):
        state['weights']['tile_layers.0.weight'][0, 0, 0, 0] = float('nan')
        metadata['weights_sha256'] = weights_checksum({'weights': state['weights']})
    rewrite(saved, change)
    with pytest.raises(ValueError, match="'tile_layers.0.weight' holds non-finite"):
        StarNetDeblender.load(saved)


def test_load_checks_sizes_before_building_the_network(saved, monkeypatch):
    """Metadata asking for a 30000-channel network (32 GB) in a small file is refused
    from the stored shapes: the network is never built."""
    rewrite(saved, lambda metadata, state: metadata.update(hidden=30000))

    def no_building(**kwargs):
        raise AssertionError('the network was built')
    monkeypatch.setattr(deblender_module, 'StarNetEncoder', no_building)
    with pytest.raises(ValueError, match='hidden=30000') as error:
        StarNetDeblender.load(saved)
    message = str(error.value)
    assert "'pixel_layers.0.weight' has shape (8, 4, 3, 3) in the file, " \
           "(30000, 4, 3, 3) by the metadata" in message


@pytest.mark.parametrize('change', [dict(tile_size=-2), dict(max_sources=1.5),
                                    dict(n_colors=3), dict(tile_hidden=True)])
def test_load_refuses_impossible_sizes(saved, change):
    rewrite(saved, lambda metadata, state: metadata.update(change))
    with pytest.raises(ValueError, match='does not describe a starnet network|is (float|bool), '
                                         'expected int'):
        StarNetDeblender.load(saved)


@pytest.mark.parametrize('inputs, expected', [
    (dict(context_cells='four'), "'context_cells' must be an integer"),
    (dict(reads_psf='yes'), "'reads_psf' must be true or false"),
    (dict(reads_colour=True), r"unknown encoder inputs \['reads_colour'\]"),
    (dict(count_tail='yes'), "'count_tail' must be true or false"),
    (dict(count_tail=True), "count_tail needs density cells")])
def test_load_refuses_impossible_encoder_inputs(saved, inputs, expected):
    rewrite(saved, lambda metadata, state: metadata.update(encoder_inputs=inputs))
    with pytest.raises(ValueError, match=expected):
        StarNetDeblender.load(saved)


def test_a_count_tail_goes_through_a_model_file(tmp_path):
    """The count tail adds no weights: a file records it and loads the same count."""
    deblender = tiny_deblender(seed=3, density_cells=4, count_tail=True)
    path = tmp_path / 'tail.pt'
    deblender.save(path)
    assert describe_model(path)['encoder_inputs']['count_tail'] is True
    loaded = StarNetDeblender.load(path)
    assert loaded.encoder.count_tail
    image, _ = simulate_starfield((16, 16), prior=PRIOR, psf=PSF, background=[686.0, 1123.0],
                                  seed=1)
    tailed = loaded.count_posterior(image, background='given')
    np.testing.assert_array_equal(tailed, deblender.count_posterior(image, background='given'))
    deblender.encoder.count_tail = False
    plain = deblender.count_posterior(image, background='given')
    assert np.dot(np.arange(len(tailed)), tailed) > np.dot(np.arange(len(plain)), plain)


def test_load_refuses_weights_of_another_encoder_input(saved):
    """A file of a pixels-only network whose metadata says it reads the mask."""
    rewrite(saved, lambda metadata, state: metadata.update(encoder_inputs={'reads_mask': True}))
    with pytest.raises(ValueError, match="'pixel_layers.0.weight' has shape"):
        StarNetDeblender.load(saved)


def test_load_refuses_background_weights_without_their_metadata(tmp_path):
    bundled = resources.files('starnet') / 'models' / 'sdss-m2.pt'
    path = tmp_path / 'model.pt'
    path.write_bytes(bundled.read_bytes())
    rewrite(path, lambda metadata, state: metadata.pop('background_encoder'))
    with pytest.raises(ValueError, match='unexpected background_weights'):
        StarNetDeblender.load(path)


def test_bundled_files_carry_a_checksum_and_files_without_one_still_load(tmp_path):
    for name in StarNetDeblender.available():
        bundled = resources.files('starnet') / 'models' / f'{name}.pt'
        metadata = json.loads(torch.load(bundled, weights_only=True)['metadata'])
        assert len(metadata['weights_sha256']) == len(metadata['sha256']) == 64
        path = tmp_path / f'{name}.pt'   # as written before checksums existed
        path.write_bytes(bundled.read_bytes())
        rewrite(path, lambda metadata, state: [metadata.pop(key)
                                               for key in ('weights_sha256', 'sha256')])
        old = StarNetDeblender.load(path)
        assert old.background_encoder is not None
        for a, b in zip(old.encoder.parameters(),
                        StarNetDeblender.pretrained(name).encoder.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


executed = []


class RunsCode:
    """Unpickling this would run ``executed.append``."""

    def __reduce__(self):
        return executed.append, ('code ran',)


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize('make, expected', [
    (lambda path: path.write_bytes(b''), 'is empty, expected a starnet model file'),
    (lambda path: path.write_text('no model here\n'), 'it may be truncated or corrupted'),
    (truncated, 'it may be truncated or corrupted'),
    (lambda path: torch.save({'a': torch.zeros(2)}, path), 'holds no metadata'),
    (lambda path: torch.save(torch.zeros(2), path), 'holds no metadata'),
    (lambda path: torch.save({'metadata': '{"format": "starnet-deb'}, path),
     'metadata is not valid JSON'),
    (lambda path: torch.save(RunsCode(), path), 'only running code from the file'),
])
def test_load_refuses_what_is_not_a_model_file(saved, make, expected):
    make(saved)
    with pytest.raises(ValueError, match=expected) as error:
        StarNetDeblender.load(saved)
    assert str(saved) in str(error.value)
    assert executed == []


def test_load_of_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError):
        StarNetDeblender.load(tmp_path / 'missing.pt')


@pytest.mark.parametrize("name", ["sdss-m2", "sdss"])
def test_a_model_file_is_described_as_its_deblender(name):
    """describe_model of a file (path or str) is that of the deblender it loads as."""
    from starnet.model_files import describe_model
    from starnet.model_io import bundled_model_path
    path = bundled_model_path(name)
    expected = describe_model(StarNetDeblender.load(path))
    assert describe_model(path) == expected == describe_model(str(path))
