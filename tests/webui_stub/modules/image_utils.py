"""OpenAI image parts -> PIL, as in webui modules/image_utils.py @1dcde41d.

Behaviour kept: ``data:image/…`` URLs are base64-decoded with ``Image.open`` and returned as
decoded (no RGB conversion, e.g. ``PngImageFile``); undecodable ones are logged and skipped;
other schemes are logged and skipped. Difference: real webui *fetches* ``http(s)`` URLs here
(image_utils.py:76-87, via web_search.safe_get with a 10 s timeout) and skips them only when the
fetch fails; the stand-in never touches the network and always takes that failure path.
"""
import base64
import io

from PIL import Image

from modules.logging_colors import logger


def decode_base64_image(base64_string):
    try:
        if base64_string.startswith('data:image/'):
            base64_string = base64_string.split(',', 1)[1]
        return Image.open(io.BytesIO(base64.b64decode(base64_string)))
    except Exception as error:
        logger.error(f'Failed to decode base64 image: {error}')
        raise ValueError(f'Invalid base64 image data: {error}')


def process_message_content(content):
    """Returns ``(text, images)``: text parts joined by single spaces, images in part order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        return str(content), []

    texts, images = [], []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get('type', '') == 'text':
            texts.append(part.get('text', ''))
        elif part.get('type', '') == 'image_url':
            url = part.get('image_url', {}).get('url', '')
            if url.startswith('data:image/'):
                try:
                    images.append(decode_base64_image(url))
                except Exception as error:
                    logger.warning(f'Failed to process a base64 image: {error}')
            elif url.startswith('http'):
                logger.warning('Failed to fetch external image: the webui stand-in does not fetch URLs')
            else:
                logger.warning(f'Unsupported image URL format: {url[:70]}...')

    return ' '.join(texts), images


def convert_image_attachments_to_pil(image_attachments):
    """UI attachment dicts -> RGB PIL images (image_utils.py:96-108)."""
    images = []
    for attachment in image_attachments:
        if attachment.get('type') == 'image' and 'image_data' in attachment:
            try:
                image = decode_base64_image(attachment['image_data'])
                images.append(image if image.mode == 'RGB' else image.convert('RGB'))
            except Exception as error:
                logger.warning(f'Failed to process image attachment: {error}')

    return images


def convert_openai_messages_to_images(messages):
    """All images of all messages, oldest first (image_utils.py:111-118)."""
    images = []
    for message in messages:
        if isinstance(message, dict) and 'content' in message:
            images.extend(process_message_content(message['content'])[1])

    return images
