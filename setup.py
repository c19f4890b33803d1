from setuptools import find_packages, setup

setup(
    name='zeoraid',
    version='0.1.dev0',
    description='RAID-1 replicating storage proxy for ZODB 6 / ZEO 6',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    license='ZPL-2.1',
    python_requires='>=3.11',
    package_dir={'': 'src'},
    packages=find_packages('src'),
    include_package_data=True,
    package_data={'zeoraid': ['*.xml']},
    zip_safe=False,
    install_requires=[
        'ZODB >= 6.0',
        'ZEO >= 6.0',
        'ZConfig',
        'zdaemon',
        'zope.interface',
        'transaction',
        'persistent',
        'BTrees',
    ],
    extras_require={
        'test': ['zope.testrunner', 'zope.testing', 'hypothesis'],
        'recipe': ['zc.buildout', 'zc.recipe.egg'],
        # the benchmark's chart (make bench installs it)
        'bench': ['matplotlib'],
    },
    entry_points={
        'zc.buildout': [
            'server = zeoraid.recipe:Server',
        ],
        'console_scripts': [
            'zeoraid = zeoraid.server:main',
            'zeoraid-manager = zeoraid.manager.cli:main',
            'zeoraid-demo = zeoraid.demo:main',
            'zeoraid-verify = zeoraid.verify:main',
        ],
    },
)
