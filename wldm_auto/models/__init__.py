"""models stage: a trained model (typed checkpoint, network factory, synthesizers) that training and inference share."""
