from setuptools import find_packages, setup

setup(
    name="wldm_auto",
    version="0.1.0",
    description="Self-configuring MR-to-CT synthesis with a 3D wavelet latent diffusion model",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["wldm_auto", "wldm_auto.*"]),
    include_package_data=True,
    package_data={"wldm_auto.dataset_conversion": ["example_data/*/*"]},
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "scipy>=1.10",
        "SimpleITK>=2.3",
        "itk-elastix>=0.20",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "PyWavelets>=1.4",
        "scikit-image>=0.21",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pydicom>=3.0",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "wldm_convert_paired=wldm_auto.cli.convert:main_paired",
            "wldm_convert_synthrad2023=wldm_auto.cli.convert:main_synthrad2023",
            "wldm_convert_synthrad2025=wldm_auto.cli.convert:main_synthrad2025",
            "wldm_convert_example=wldm_auto.cli.convert:main_example",
            "wldm_validate_dataset=wldm_auto.cli.convert:main_validate",
            "wldm_plan_and_preprocess=wldm_auto.cli.plan_and_preprocess:main",
            "wldm_demo=wldm_auto.cli.demo:main",
            "wldm_train=wldm_auto.cli.train:main",
            "wldm_predict=wldm_auto.cli.predict:main",
            "wldm_export_model=wldm_auto.cli.model_archive:main_export",
            "wldm_install_model=wldm_auto.cli.model_archive:main_install",
            "wldm_evaluate=wldm_auto.cli.evaluate:main",
        ]
    },
)
