"""Images and videos for the GLM-4.xV models, torch-free (PIL + numpy; PyAV optional for video files).

    glm4.media.image   load_image, smart_resize, preprocess_images -> pixel_values / image_grid_thw; VisionSpec;
                       MediaError (one-line reason, fit for a 400)
    glm4.media.video   Video (frames + timestamps), video_from_images, load_video (PyAV), sample_frame_indices(_glm46v),
                       preprocess_videos -> pixel_values_videos / video_grid_thw / video_timestamps
    glm4.media.prompt  expand_placeholders (the <|image|> / <|video|> tokens), token_types (mm_token_type_ids),
                       process (one prompt with its media -> model inputs)
    glm4.media.glm4v_9b  GLM-4V-9B: preprocess_square (1120 x 1120, CLIP mean / std), expand_image_placeholders

The arrays are numpy; `torch.from_numpy` them for `model(input_ids, pixel_values=..., image_grid_thw=...)`.
"""
