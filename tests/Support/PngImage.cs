using System.Buffers.Binary;
using System.IO.Compression;

namespace KernelLM.Tests.Support;

/// <summary>
/// A minimal PNG reader for the browser tests' screenshots (System.Drawing is Windows-only): 8-bit RGB or RGBA,
/// not interlaced, which is what Chromium writes. Chunks are read in order, the IDAT data inflated with
/// <see cref="ZLibStream"/> and each scanline unfiltered (None, Sub, Up, Average, Paeth; PNG spec section 9).
/// </summary>
public sealed class PngImage
{
    private PngImage(int width, int height, uint[] pixels)
    {
        Width = width;
        Height = height;
        Pixels = pixels;
    }

    public int Width { get; }
    public int Height { get; }

    /// <summary>[height, width] row-major, 0xRRGGBBAA.</summary>
    public uint[] Pixels { get; }

    public static PngImage Read(byte[] file)
    {
        ReadOnlySpan<byte> signature = [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A];
        if (file.Length < 8 || !file.AsSpan(0, 8).SequenceEqual(signature))
        {
            throw new InvalidDataException("not a PNG file");
        }
        int width = 0, height = 0, channels = 0;
        using var compressed = new MemoryStream();
        for (int at = 8; at + 12 <= file.Length;)
        {
            int length = BinaryPrimitives.ReadInt32BigEndian(file.AsSpan(at));
            string type = System.Text.Encoding.ASCII.GetString(file, at + 4, 4);
            var data = file.AsSpan(at + 8, length);
            if (type == "IHDR")
            {
                width = BinaryPrimitives.ReadInt32BigEndian(data);
                height = BinaryPrimitives.ReadInt32BigEndian(data[4..]);
                byte bitDepth = data[8], colorType = data[9], interlace = data[12];
                channels = colorType switch { 2 => 3, 6 => 4, _ => 0 };
                if (bitDepth != 8 || channels == 0 || interlace != 0)
                {
                    throw new InvalidDataException($"PNG bit depth {bitDepth}, colour type {colorType}, interlace {interlace}: only 8-bit RGB/RGBA, not interlaced");
                }
            }
            else if (type == "IDAT")
            {
                compressed.Write(data);
            }
            else if (type == "IEND")
            {
                break;
            }
            at += 12 + length;
        }
        compressed.Position = 0;
        int stride = width * channels;
        var raw = new byte[(long)height * (stride + 1)];
        using (var inflate = new ZLibStream(compressed, CompressionMode.Decompress))
        {
            inflate.ReadExactly(raw);
        }
        var previous = new byte[stride];
        var line = new byte[stride];
        var pixels = new uint[width * height];
        for (int y = 0; y < height; y++)
        {
            int filter = raw[y * (stride + 1)];
            raw.AsSpan(y * (stride + 1) + 1, stride).CopyTo(line);
            for (int i = 0; i < stride; i++)
            {
                int left = i >= channels ? line[i - channels] : 0;
                int up = previous[i];
                int upLeft = i >= channels ? previous[i - channels] : 0;
                line[i] += (byte)(filter switch
                {
                    0 => 0,
                    1 => left,
                    2 => up,
                    3 => (left + up) / 2,
                    4 => Paeth(left, up, upLeft),
                    _ => throw new InvalidDataException($"PNG row {y}: unknown filter {filter}"),
                });
            }
            for (int x = 0; x < width; x++)
            {
                int p = x * channels;
                uint alpha = channels == 4 ? line[p + 3] : 255u;
                pixels[y * width + x] = (uint)line[p] << 24 | (uint)line[p + 1] << 16 | (uint)line[p + 2] << 8 | alpha;
            }
            (previous, line) = (line, previous);
        }
        return new PngImage(width, height, pixels);
    }

    private static int Paeth(int left, int up, int upLeft)
    {
        int estimate = left + up - upLeft;
        int toLeft = Math.Abs(estimate - left), toUp = Math.Abs(estimate - up), toUpLeft = Math.Abs(estimate - upLeft);
        return toLeft <= toUp && toLeft <= toUpLeft ? left : toUp <= toUpLeft ? up : upLeft;
    }
}
