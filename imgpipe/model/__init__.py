"""TensorFlow and Keras: shards, backbones, the model builder, training, loading, export and prediction."""
