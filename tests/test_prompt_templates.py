"""One source of truth for the prompt templates: `config.prompt_templates`. A processor built with other templates
is refused by the model (forward, `get_text_embeddings`, the sliding-window helper), the pipeline and
`publish_to_hub`; with the model's templates, every (class, template) prompt lands where the model reads it.

The issue's scenario: a 2-template config, a 1-template processor and 4 class names. Its 4 prompt rows would be read
as 2 classes of 2 templates each (2 class maps, masks named after the wrong labels) without the check.
"""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_configs import tiny_config
from transformers import pipeline

from modeling_disa import PIPELINE_TASK, DiSaForOpenVocabSegmentation, DiSaProcessor
from modeling_disa.model.inference import sliding_window_probs

TWO_TEMPLATES = ["A photo of a {} in the scene", "a sketch of a {}"]
NAMES = ["cat", "sky", "road", "building, edifice"]


@pytest.fixture(scope="module")
def two_template_model():
    torch.manual_seed(0)
    # the tiny preset's stored default vocabulary has one template's prompts: dropped with the second template
    config = tiny_config(prompt_templates=TWO_TEMPLATES, label_token_ids=None)
    return DiSaForOpenVocabSegmentation(config).eval()


def processor_with(processor, templates):
    return DiSaProcessor(processor.image_processor, processor.tokenizer, prompt_templates=templates)


def image():
    return Image.new("RGB", (80, 60), (40, 120, 200))


def test_model_refuses_prompts_of_other_templates(two_template_model, tiny_processor):
    assert tiny_processor.prompt_templates == TWO_TEMPLATES[:1]  # the 1-template processor of the issue
    inputs = tiny_processor(images=image(), text=NAMES)
    assert inputs["input_ids"].shape[0] == 4  # 4 rows: divisible by P = 2, so the row count alone cannot tell
    message = r"prompt templates \['A photo of a \{\} in the scene'\].*config.prompt_templates is \[.*a sketch"
    with pytest.raises(ValueError, match=message) as info:
        two_template_model(**inputs)
    assert "DiSaProcessor.from_pretrained" in str(info.value) and "model.config.prompt_templates" in str(info.value)
    with pytest.raises(ValueError, match=message):
        two_template_model.get_text_embeddings(**tiny_processor.tokenize_class_names(NAMES))
    with pytest.raises(ValueError, match=message):  # CAT-Seg's sliding window given the processor's tokens
        sliding_window_probs(
            two_template_model,
            inputs["pixel_values"],
            warp_size=160,
            window_size=128,
            stride=32,
            **tiny_processor.tokenize_class_names(NAMES),
        )
    # same count, other template: still not the prompts the model reads
    swapped = processor_with(tiny_processor, TWO_TEMPLATES[::-1])
    with pytest.raises(ValueError, match="config.prompt_templates"):
        two_template_model(**swapped(images=image(), text=NAMES))
    # without the processor's metadata only the row count can be checked
    with pytest.raises(ValueError, match="not a multiple of the 2 prompt templates"):
        two_template_model.get_text_embeddings(tiny_processor.tokenize_class_names(NAMES[:3])["input_ids"])


def test_matching_templates_put_every_prompt_where_the_model_reads_it(two_template_model, tiny_processor):
    model = two_template_model
    processor = processor_with(tiny_processor, model.config.prompt_templates)
    inputs = processor(images=image(), text=NAMES)
    assert inputs["prompt_templates"] == TWO_TEMPLATES
    with torch.no_grad():
        out = model(**inputs)
        # reference: each prompt string written out here and encoded on its own by CLIP's text tower
        first_synonyms = ["cat", "sky", "road", "building"]
        expected = torch.stack(
            [
                torch.stack(
                    [
                        F.normalize(
                            model.clip.text_projection(
                                model.clip.text_model(
                                    **processor.tokenizer([template.format(name)], return_tensors="pt")
                                ).pooler_output
                            ),
                            dim=-1,
                        )[0]
                        for template in TWO_TEMPLATES
                    ]
                )
                for name in first_synonyms
            ]
        )
    assert out.logits.shape[1] == len(NAMES)
    torch.testing.assert_close(out.text_embeds, expected, rtol=1e-5, atol=1e-6)


def test_pipeline_refuses_a_processor_with_other_templates(two_template_model, tiny_processor):
    with pytest.raises(ValueError, match=r"config.prompt_templates is \['A photo of a \{\} in the scene', 'a sk"):
        pipeline(PIPELINE_TASK, model=two_template_model, processor=tiny_processor)
    # the templates changed after the pipeline was built: refused when the labels are encoded
    segmenter = pipeline(
        PIPELINE_TASK, model=two_template_model, processor=processor_with(tiny_processor, TWO_TEMPLATES)
    )
    segmenter.processor.prompt_templates = TWO_TEMPLATES[:1]
    with pytest.raises(ValueError, match="config.prompt_templates"):
        segmenter(image(), candidate_labels=NAMES)


def test_pipeline_with_matching_templates_names_every_class(two_template_model, tiny_processor):
    processor = processor_with(tiny_processor, TWO_TEMPLATES)
    segmenter = pipeline(PIPELINE_TASK, model=two_template_model, processor=processor)
    picture = image()
    result = segmenter(picture, candidate_labels=NAMES)
    with torch.no_grad():
        logits = two_template_model(**processor(images=picture, text=NAMES)).logits
    probabilities = F.interpolate(logits.sigmoid(), size=(60, 80), mode="bilinear", align_corners=False)[0]
    present = sorted(NAMES[i] for i in probabilities.argmax(0).unique().tolist())
    assert sorted(entry["label"] for entry in result) == present


def test_publishing_refuses_a_processor_with_other_templates(two_template_model, tiny_processor, tmp_path):
    from modeling_disa.hub import save_for_hub

    with pytest.raises(ValueError, match="config.prompt_templates"):
        save_for_hub(two_template_model, tiny_processor, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "templates, error",
    [("A photo of a {}", TypeError), ([], ValueError), (["no placeholder"], ValueError)],
)
def test_processor_refuses_templates_it_cannot_use(tiny_processor, templates, error):
    with pytest.raises(error, match="prompt_templates"):
        processor_with(tiny_processor, templates)
